package main

import (
	"bytes"
	"errors"
)

var errMalformed = errors.New("malformed response")

var crlf = []byte("\r\n")

// head is what both engines need of a response head: the status and how the body is framed.
type head struct {
	status  int
	length  int64 // -1: no Content-Length
	te      bool  // a Transfer-Encoding
	chunked bool  // ... that is chunked
	close   bool
	// location points into the bytes parsed: copy it to keep it.
	location []byte
}

// parseHead parses a response head (the status line and the header fields, without the final
// CRLF CRLF) in place: nothing is allocated.
func parseHead(b []byte, h *head) error {
	line, rest, _ := bytes.Cut(b, crlf)
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) {
		return errMalformed
	}
	*h = head{status: int(line[9]-'0')*100 + int(line[10]-'0')*10 + int(line[11]-'0'), length: -1}
	for len(rest) > 0 {
		line, rest, _ = bytes.Cut(rest, crlf)
		k, v, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return errMalformed
		}
		v = bytes.TrimSpace(v)
		switch {
		case bytes.EqualFold(k, []byte("content-length")):
			n, ok := atoi(v)
			if !ok {
				return errMalformed
			}
			h.length = n
		case bytes.EqualFold(k, []byte("transfer-encoding")):
			h.te = true
			h.chunked = bytes.Contains(bytes.ToLower(v), []byte("chunked"))
		case bytes.EqualFold(k, []byte("connection")):
			h.close = bytes.EqualFold(v, []byte("close"))
		case bytes.EqualFold(k, []byte("location")):
			h.location = v
		}
	}
	return nil
}

// atoi parses a decimal length: digits only, at most 2^50.
func atoi(b []byte) (int64, bool) {
	var n int64
	for _, d := range b {
		if d < '0' || d > '9' || n > 1<<50 {
			return 0, false
		}
		n = n*10 + int64(d-'0')
	}
	return n, len(b) > 0
}
