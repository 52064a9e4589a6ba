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
{{- /* server.workers unless set: 2, sized for the default memory limit (auto would be every core of a node without a CPU limit, and memory grows with each worker); with client certificates auto (a single process: more is refused). */ -}}
{{- if not (hasKey $server "workers") -}}
{{- $_ := set $server "workers" (ternary "auto" 2 (and .Values.config.access .Values.config.access.clientCertificates | default false)) -}}
{{- end -}}
{{- $_ := set $c "server" (merge (dict "host" "0.0.0.0" "port" 5000 "shutdownTimeout" "30s") $server) -}}
{{- include "ocicache.checkTls" . -}}
{{- if .Values.tls.existingSecret -}}
{{- $tls := dict "certFile" "/etc/ocicache/tls/tls.crt" "keyFile" "/etc/ocicache/tls/tls.key" -}}
{{- if .Values.tls.clientCaSecret -}}
{{- $_ := set $tls "clientCaFile" "/etc/ocicache/client-ca/ca.crt" -}}
{{- end -}}
{{- $_ := set $c.server "tls" (merge $tls ($server.tls | default dict)) -}}
{{- end -}}
{{- $storage := $c.storage | default dict -}}
{{- $_ := set $storage "root" "/data" -}}
{{- if .Values.s3.credentialsSecret -}}
{{- if not (and $storage.s3 (eq ($storage.backend | default "disk") "s3")) -}}
{{- fail "s3.credentialsSecret is set but config.storage.backend is not s3 with config.storage.s3" -}}
{{- end -}}
{{- $_ := set $storage.s3 "credentialsFile" (printf "/etc/ocicache/s3/%s" .Values.s3.credentialsKey) -}}
{{- end -}}
{{- $_ := set $c "storage" $storage -}}
{{- $ups := list -}}
{{- range $i, $u := $c.upstreams -}}
{{- $u := deepCopy $u -}}
{{- if and $u.auth $u.auth.passwordSecretKey -}}
{{- $_ := set $u "auth" (dict "username" $u.auth.username "passwordFile" (printf "/etc/ocicache/secrets/%s" $u.auth.passwordSecretKey)) -}}
{{- else if and $u.auth $u.auth.pullSecret -}}
{{- $_ := set $u "auth" (dict "dockerConfig" (printf "/etc/ocicache/pull-secrets/%s/.dockerconfigjson" $u.auth.pullSecret)) -}}
{{- end -}}
{{- if $u.caSecret -}}
{{- $_ := set $u "caFile" (printf "/etc/ocicache/upstreams/%d/ca/ca.crt" $i) -}}
{{- end -}}
{{- if $u.clientCertSecret -}}
{{- $_ := set $u "clientCertFile" (printf "/etc/ocicache/upstreams/%d/client/tls.crt" $i) -}}
{{- $_ := set $u "clientKeyFile" (printf "/etc/ocicache/upstreams/%d/client/tls.key" $i) -}}
{{- end -}}
{{- $_ := unset $u "caSecret" -}}
{{- $_ := unset $u "clientCertSecret" -}}
{{- $ups = append $ups $u -}}
{{- end -}}
{{- $_ := set $c "upstreams" $ups -}}
{{- include "ocicache.checkCredentials" . -}}
{{- if .Values.credentials.pullSecret -}}
{{- $creds := deepCopy ($c.credentials | default dict) -}}
{{- $_ := set $creds "dockerConfig" "/etc/ocicache/pull-secret/.dockerconfigjson" -}}
{{- $_ := set $c "credentials" $creds -}}
{{- end -}}
{{- if .Values.admin.existingSecret -}}
{{- $_ := set $c "admin" (dict "tokenFile" (printf "/etc/ocicache/admin/%s" .Values.admin.key)) -}}
{{- end -}}
{{- include "ocicache.checkAccess" . -}}
{{- if $c.access -}}
{{- if include "ocicache.htpasswdUsers" . -}}
{{- $_ := set $c.access "htpasswd" "/etc/ocicache/access/htpasswd" -}}
{{- end -}}
{{- if .Values.access.tokenKey.existingSecret -}}
{{- $_ := set $c.access "tokenKeyFile" "/etc/ocicache/token-key/key" -}}
{{- end -}}
{{- end -}}
{{- toYaml $c -}}
{{- end -}}

{{/* Credential values that cannot work together are refused with a message that names them. */}}
{{- define "ocicache.checkCredentials" -}}
{{- $names := list -}}
{{- range .Values.credentials.helpers -}}
{{- if has .name $names -}}
{{- fail (printf "credentials.helpers: %s is listed twice" .name) -}}
{{- end -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- if and .Values.config.parent (or .Values.credentials.pullSecret .Values.credentials.helpers) -}}
{{- fail "credentials.pullSecret and credentials.helpers are set, but config.parent is too: a cache with a parent holds no upstream credentials (the parent does)" -}}
{{- end -}}
{{- end -}}

{{/* The pull secrets upstreams name with auth.pullSecret, each once, as a JSON list. */}}
{{- define "ocicache.pullSecrets" -}}
{{- $names := list -}}
{{- range .Values.config.upstreams -}}
{{- if and .auth .auth.pullSecret -}}
{{- $names = append $names .auth.pullSecret -}}
{{- end -}}
{{- end -}}
{{- $names | uniq | toJson -}}
{{- end -}}

{{/* The cache container's environment: the replica's name in a fleet, the helpers' PATH, extraEnv. */}}
{{- define "ocicache.env" -}}
{{- $env := list -}}
{{- if .Values.fleet.enabled -}}
{{- /* The replica's name in answers (X-Ocicache-Replica), metrics and the status page. */ -}}
{{- $env = append $env (dict "name" "OCICACHE_REPLICA" "valueFrom" (dict "fieldRef" (dict "fieldPath" "metadata.name"))) -}}
{{- end -}}
{{- if .Values.credentials.helpers -}}
{{- $env = append $env (dict "name" "PATH" "value" "/opt/ocicache/helpers:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") -}}
{{- end -}}
{{- $env = concat $env .Values.extraEnv -}}
{{- if $env -}}{{- toYaml $env -}}{{- end -}}
{{- end -}}

{{- define "ocicache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "ocicache.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "ocicache.htpasswdSecret" -}}
{{- .Values.access.htpasswd.existingSecret | default (printf "%s-htpasswd" (include "ocicache.fullname" .)) -}}
{{- end -}}

{{/* Whether htpasswd users are given (a Secret of yours or inline lines): "true" or empty. */}}
{{- define "ocicache.htpasswdUsers" -}}
{{- if or .Values.access.htpasswd.existingSecret .Values.access.htpasswd.users -}}true{{- end -}}
{{- end -}}

{{/* config.access and the htpasswd Secret come together (or client certificates name the users): access without users, or users that would be ignored, is refused. */}}
{{- define "ocicache.checkAccess" -}}
{{- $users := include "ocicache.htpasswdUsers" . -}}
{{- $certificates := and .Values.config.access .Values.config.access.clientCertificates -}}
{{- if and .Values.config.access (not $users) (not $certificates) -}}
{{- fail "config.access is set but no users: set access.htpasswd.existingSecret (a Secret with an htpasswd -B file) or access.htpasswd.users (htpasswd -nB lines), or config.access.clientCertificates with tls.clientCaSecret" -}}
{{- end -}}
{{- if and $certificates (not .Values.tls.clientCaSecret) -}}
{{- fail "config.access.clientCertificates is set but tls.clientCaSecret is not: only a certificate checked against a client CA may name a user" -}}
{{- end -}}
{{- if and (not .Values.config.access) (or $users .Values.access.tokenKey.existingSecret) -}}
{{- fail "access.htpasswd or access.tokenKey is set but config.access is not: access control would be off; set config.access.rules" -}}
{{- end -}}
{{- if and .Values.access.htpasswd.existingSecret .Values.access.htpasswd.users -}}
{{- fail "access.htpasswd: set existingSecret or users, not both" -}}
{{- end -}}
{{- end -}}

{{/* tls.existingSecret turns HTTPS on; config.server.tls (reloadInterval) or a client CA without it is refused. */}}
{{- define "ocicache.checkTls" -}}
{{- if and (not .Values.tls.existingSecret) (and .Values.config.server .Values.config.server.tls) -}}
{{- fail "config.server.tls is set but tls.existingSecret is not: set tls.existingSecret (a kubernetes.io/tls Secret); the chart fills in certFile, keyFile and clientCaFile" -}}
{{- end -}}
{{- if and (not .Values.tls.existingSecret) .Values.tls.clientCaSecret -}}
{{- fail "tls.clientCaSecret is set but tls.existingSecret is not: client certificates need HTTPS; set tls.existingSecret" -}}
{{- end -}}
{{- end -}}

{{/* The probes: HTTPS with tls.existingSecret; with client certificates required the kubelet (no client certificate) cannot finish a handshake, so they only check the port. */}}
{{- define "ocicache.probe" -}}
{{- $server := .root.Values.config.server | default dict -}}
{{- $optional := eq (($server.tls | default dict).clientCertificates | default "required") "optional" -}}
{{- if and .root.Values.tls.clientCaSecret (not $optional) -}}
tcpSocket: {port: http}
{{- else -}}
httpGet: {path: {{ .path }}, port: http{{ if .root.Values.tls.existingSecret }}, scheme: HTTPS{{ end }}}
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
{{- with include "ocicache.serviceAccountName" . }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.credentials.helpers }}
initContainers:
  {{- range . }}
  # Puts docker-credential-{{ .name }} on the cache's PATH.
  - name: helper-{{ .name }}
    image: {{ .image | quote }}
    command: {{ toJson (.command | default (list "cp" .path (printf "/helpers/docker-credential-%s" .name))) }}
    securityContext:
      {{- toYaml $.Values.securityContext | nindent 6 }}
    volumeMounts:
      - {name: helpers, mountPath: /helpers}
  {{- end }}
{{- end }}
containers:
  - name: ocicache
    image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    args: ["serve", "--config", "/etc/ocicache/config.yaml"]
    {{- with include "ocicache.env" . }}
    env:
      {{- . | nindent 6 }}
    {{- end }}
    ports:
      - name: http
        containerPort: 5000
        protocol: TCP
        {{- if and (eq .Values.mode "node") (not .Values.node.hostNetwork) }}
        hostPort: {{ .Values.node.hostPort }}
        {{- end }}
    readinessProbe:
      {{- include "ocicache.probe" (dict "root" . "path" "/readyz") | nindent 6 }}
      periodSeconds: 5
      failureThreshold: 2
    livenessProbe:
      {{- include "ocicache.probe" (dict "root" . "path" "/healthz") | nindent 6 }}
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
      {{- if .Values.credentials.pullSecret }}
      - {name: pull-secret, mountPath: /etc/ocicache/pull-secret, readOnly: true}
      {{- end }}
      {{- range $i, $name := include "ocicache.pullSecrets" . | fromJsonArray }}
      - {name: pull-secret-{{ $i }}, mountPath: /etc/ocicache/pull-secrets/{{ $name }}, readOnly: true}
      {{- end }}
      {{- if .Values.credentials.helpers }}
      - {name: helpers, mountPath: /opt/ocicache/helpers, readOnly: true}
      {{- end }}
      {{- if .Values.s3.credentialsSecret }}
      - {name: s3-credentials, mountPath: /etc/ocicache/s3, readOnly: true}
      {{- end }}
      {{- if .Values.admin.existingSecret }}
      - {name: admin, mountPath: /etc/ocicache/admin, readOnly: true}
      {{- end }}
      {{- if and .Values.config.access (include "ocicache.htpasswdUsers" .) }}
      - {name: htpasswd, mountPath: /etc/ocicache/access, readOnly: true}
      {{- if .Values.access.tokenKey.existingSecret }}
      - {name: token-key, mountPath: /etc/ocicache/token-key, readOnly: true}
      {{- end }}
      {{- end }}
      {{- if .Values.tls.existingSecret }}
      - {name: tls, mountPath: /etc/ocicache/tls, readOnly: true}
      {{- if .Values.tls.clientCaSecret }}
      - {name: client-ca, mountPath: /etc/ocicache/client-ca, readOnly: true}
      {{- end }}
      {{- end }}
      {{- range $i, $u := .Values.config.upstreams }}
      {{- if $u.caSecret }}
      - {name: upstream-{{ $i }}-ca, mountPath: /etc/ocicache/upstreams/{{ $i }}/ca, readOnly: true}
      {{- end }}
      {{- if $u.clientCertSecret }}
      - {name: upstream-{{ $i }}-client, mountPath: /etc/ocicache/upstreams/{{ $i }}/client, readOnly: true}
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
  {{- /* Pull secrets mounted whole (not subPath): a rotated secret reaches the pod, which rereads it. */}}
  {{- with .Values.credentials.pullSecret }}
  - name: pull-secret
    secret:
      secretName: {{ . }}
      items: [{key: .dockerconfigjson, path: .dockerconfigjson}]
  {{- end }}
  {{- range $i, $name := include "ocicache.pullSecrets" . | fromJsonArray }}
  - name: pull-secret-{{ $i }}
    secret:
      secretName: {{ $name }}
      items: [{key: .dockerconfigjson, path: .dockerconfigjson}]
  {{- end }}
  {{- if .Values.credentials.helpers }}
  - name: helpers
    emptyDir: {sizeLimit: 256Mi}
  {{- end }}
  {{- with .Values.s3.credentialsSecret }}
  - name: s3-credentials
    secret:
      secretName: {{ . }}
      items: [{key: {{ $.Values.s3.credentialsKey | quote }}, path: {{ $.Values.s3.credentialsKey | quote }}}]
  {{- end }}
  {{- if .Values.admin.existingSecret }}
  - name: admin
    secret:
      secretName: {{ .Values.admin.existingSecret }}
  {{- end }}
  {{- if .Values.config.access }}
  {{- if include "ocicache.htpasswdUsers" . }}
  {{- /* Whole-Secret mounts (not subPath) so an edited htpasswd reaches the pod, which rereads it. */}}
  - name: htpasswd
    secret:
      secretName: {{ include "ocicache.htpasswdSecret" . }}
      items: [{key: {{ .Values.access.htpasswd.key | quote }}, path: htpasswd}]
  {{- end }}
  {{- if .Values.access.tokenKey.existingSecret }}
  - name: token-key
    secret:
      secretName: {{ .Values.access.tokenKey.existingSecret }}
      items: [{key: {{ .Values.access.tokenKey.key | quote }}, path: key}]
  {{- end }}
  {{- end }}
  {{- if .Values.tls.existingSecret }}
  {{- /* Whole-Secret mounts too: a renewed certificate (cert-manager) reaches the pod, which reloads it. */}}
  - name: tls
    secret:
      secretName: {{ .Values.tls.existingSecret }}
      items: [{key: tls.crt, path: tls.crt}, {key: tls.key, path: tls.key}]
  {{- if .Values.tls.clientCaSecret }}
  - name: client-ca
    secret:
      secretName: {{ .Values.tls.clientCaSecret }}
      items: [{key: {{ .Values.tls.clientCaKey | default "ca.crt" | quote }}, path: ca.crt}]
  {{- end }}
  {{- end }}
  {{- range $i, $u := .Values.config.upstreams }}
  {{- with $u.caSecret }}
  - name: upstream-{{ $i }}-ca
    secret:
      secretName: {{ .name }}
      items: [{key: {{ .key | default "ca.crt" | quote }}, path: ca.crt}]
  {{- end }}
  {{- with $u.clientCertSecret }}
  - name: upstream-{{ $i }}-client
    secret:
      secretName: {{ .name }}
      items: [{key: tls.crt, path: tls.crt}, {key: tls.key, path: tls.key}]
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

{{/* Fleet mode: the headless Service that gives each replica a stable DNS name. */}}
{{- define "ocicache.replicasService" -}}
{{ include "ocicache.fullname" . }}-replicas
{{- end -}}

{{/* The fleet's checks: central mode only, and the balancer hashes paths, so it must see them (no TLS to the replicas yet). */}}
{{- define "ocicache.checkFleet" -}}
{{- if .Values.fleet.enabled -}}
{{- if ne .Values.mode "central" -}}
{{- fail "fleet.enabled needs mode: central (the replicas are the StatefulSet's)" -}}
{{- end -}}
{{- if .Values.tls.existingSecret -}}
{{- fail "fleet.enabled with tls.existingSecret: the balancer hashes request paths, so TLS would end at HAProxy; not in the chart yet: terminate TLS in front of the balancer" -}}
{{- end -}}
{{- end -}}
{{- end -}}
