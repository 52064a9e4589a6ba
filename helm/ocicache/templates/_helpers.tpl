{{- define "ocicache.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ocicache.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ocicache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ocicache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ocicache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ocicache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ocicache.credentialsSecret" -}}
{{- .Values.credentials.existingSecret | default (printf "%s-credentials" (include "ocicache.fullname" .)) -}}
{{- end -}}

{{/* The config file: values.config with the container's fixed paths and secrets as files. */}}
{{- define "ocicache.config" -}}
{{- $c := deepCopy .Values.config -}}
{{- $server := deepCopy ($c.server | default dict) -}}
{{- $_ := set $c "server" (merge (dict "host" "0.0.0.0" "port" 5000 "shutdownTimeout" "30s") $server) -}}
{{- $storage := $c.storage | default dict -}}
{{- $_ := set $storage "root" "/data" -}}
{{- $_ := set $c "storage" $storage -}}
{{- $ups := list -}}
{{- range $u := $c.upstreams -}}
{{- $u := deepCopy $u -}}
{{- if and $u.auth $u.auth.passwordSecretKey -}}
{{- $_ := set $u "auth" (dict "username" $u.auth.username "passwordFile" (printf "/etc/ocicache/secrets/%s" $u.auth.passwordSecretKey)) -}}
{{- end -}}
{{- $ups = append $ups $u -}}
{{- end -}}
{{- $_ := set $c "upstreams" $ups -}}
{{- if .Values.admin.existingSecret -}}
{{- $_ := set $c "admin" (dict "tokenFile" (printf "/etc/ocicache/admin/%s" .Values.admin.key)) -}}
{{- end -}}
{{- include "ocicache.checkAccess" . -}}
{{- if $c.access -}}
{{- $_ := set $c.access "htpasswd" "/etc/ocicache/access/htpasswd" -}}
{{- if .Values.access.tokenKey.existingSecret -}}
{{- $_ := set $c.access "tokenKeyFile" "/etc/ocicache/token-key/key" -}}
{{- end -}}
{{- end -}}
{{- toYaml $c -}}
{{- end -}}

{{- define "ocicache.htpasswdSecret" -}}
{{- .Values.access.htpasswd.existingSecret | default (printf "%s-htpasswd" (include "ocicache.fullname" .)) -}}
{{- end -}}

{{/* config.access and the htpasswd Secret come together: access without users, or users that would be ignored, is refused. */}}
{{- define "ocicache.checkAccess" -}}
{{- $users := or .Values.access.htpasswd.existingSecret .Values.access.htpasswd.users -}}
{{- if and .Values.config.access (not $users) -}}
{{- fail "config.access is set but no users: set access.htpasswd.existingSecret (a Secret with an htpasswd -B file) or access.htpasswd.users (htpasswd -nB lines)" -}}
{{- end -}}
{{- if and (not .Values.config.access) (or $users .Values.access.tokenKey.existingSecret) -}}
{{- fail "access.htpasswd or access.tokenKey is set but config.access is not: access control would be off; set config.access.rules" -}}
{{- end -}}
{{- if and .Values.access.htpasswd.existingSecret .Values.access.htpasswd.users -}}
{{- fail "access.htpasswd: set existingSecret or users, not both" -}}
{{- end -}}
{{- end -}}

{{/* The pod spec shared by the StatefulSet and the DaemonSet. */}}
{{- define "ocicache.podSpec" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
containers:
  - name: ocicache
    image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    args: ["serve", "--config", "/etc/ocicache/config.yaml"]
    ports:
      - name: http
        containerPort: 5000
        protocol: TCP
        {{- if and (eq .Values.mode "node") (not .Values.node.hostNetwork) }}
        hostPort: {{ .Values.node.hostPort }}
        {{- end }}
    readinessProbe:
      httpGet: {path: /readyz, port: http}
      periodSeconds: 5
      failureThreshold: 2
    livenessProbe:
      httpGet: {path: /healthz, port: http}
      periodSeconds: 10
      failureThreshold: 6
    resources:
      {{- toYaml .Values.resources | nindent 6 }}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    volumeMounts:
      - {name: config, mountPath: /etc/ocicache/config.yaml, subPath: config.yaml, readOnly: true}
      - {name: cache, mountPath: /data}
      {{- if or .Values.credentials.existingSecret .Values.credentials.passwords }}
      - {name: credentials, mountPath: /etc/ocicache/secrets, readOnly: true}
      {{- end }}
      {{- if .Values.admin.existingSecret }}
      - {name: admin, mountPath: /etc/ocicache/admin, readOnly: true}
      {{- end }}
      {{- if .Values.config.access }}
      - {name: htpasswd, mountPath: /etc/ocicache/access, readOnly: true}
      {{- if .Values.access.tokenKey.existingSecret }}
      - {name: token-key, mountPath: /etc/ocicache/token-key, readOnly: true}
      {{- end }}
      {{- end }}
volumes:
  - name: config
    configMap:
      name: {{ include "ocicache.fullname" . }}
  {{- if eq .Values.mode "node" }}
  - name: cache
    {{- if eq .Values.node.cache.type "hostPath" }}
    hostPath:
      path: {{ .Values.node.cache.hostPath }}
      type: DirectoryOrCreate
    {{- else }}
    emptyDir:
      sizeLimit: {{ .Values.node.cache.sizeLimit }}
    {{- end }}
  {{- end }}
  {{- if or .Values.credentials.existingSecret .Values.credentials.passwords }}
  - name: credentials
    secret:
      secretName: {{ include "ocicache.credentialsSecret" . }}
  {{- end }}
  {{- if .Values.admin.existingSecret }}
  - name: admin
    secret:
      secretName: {{ .Values.admin.existingSecret }}
  {{- end }}
  {{- if .Values.config.access }}
  {{- /* Whole-Secret mounts (not subPath) so an edited htpasswd reaches the pod, which rereads it. */}}
  - name: htpasswd
    secret:
      secretName: {{ include "ocicache.htpasswdSecret" . }}
      items: [{key: {{ .Values.access.htpasswd.key | quote }}, path: htpasswd}]
  {{- if .Values.access.tokenKey.existingSecret }}
  - name: token-key
    secret:
      secretName: {{ .Values.access.tokenKey.existingSecret }}
      items: [{key: {{ .Values.access.tokenKey.key | quote }}, path: key}]
  {{- end }}
  {{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
