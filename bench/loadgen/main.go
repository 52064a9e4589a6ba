// loadgen: the HTTP/1.1 load generator of the ocicache benchmark, built to be at least as strong
// as wrk (the bench checks that in every run, against wrk on nginx). Requests are serialised once
// at start and responses parsed by hand from large read buffers: no per-request allocation, no
// net/http machinery. Unlike wrk 4.1 it
// handles HEAD (wrk waits for the body a HEAD answer announces and stalls), it follows redirects
// as registry clients do (a 307 to object storage), and it reports latency at microsecond
// resolution. Standard library only.
//
//	loadgen -url URL [-urlfile F] [-method GET|HEAD] [-c 50] [-t threads] [-follow]
//	        [-d 10s | -n 100] [-H 'Name: value']...
//
// Two engines: by default a few threads each drive their share of the connections with epoll, as
// wrk does (epoll.go); -follow selects one goroutine per connection that can follow redirects.
//
// Prints one JSON object: requests, errors, non2xx, bytes, seconds, rps, mibps, p50us, p99us,
// cpuSeconds (its own CPU time during the run), cpuShare (that time over the run's wall time:
// 2 is two cores busy).
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// cpuSeconds is the CPU time (user + system) this process has used: what generating load costs.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

type headers []string

func (h *headers) String() string     { return strings.Join(*h, ", ") }
func (h *headers) Set(v string) error { *h = append(*h, v); return nil }

// target is one URL with its request bytes, built once.
type target struct {
	addr    string
	request []byte
}

func newTarget(raw, method string, hs []string) (target, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "http" || u.Host == "" {
		return target{}, fmt.Errorf("%q: an http:// URL is needed", raw)
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: loadgen\r\n", method, u.RequestURI(), u.Host)
	for _, h := range hs {
		k, v, _ := strings.Cut(h, ":")
		fmt.Fprintf(&b, "%s: %s\r\n", strings.TrimSpace(k), strings.TrimSpace(v))
	}
	b.WriteString("\r\n")
	addr := u.Host
	if u.Port() == "" {
		addr += ":80"
	}
	return target{addr: addr, request: b.Bytes()}, nil
}

// conn is one kept-alive connection and its read buffer.
type conn struct {
	c net.Conn
	r *bufio.Reader
}

// response is what the loop needs of an answer's head.
type response struct {
	status   int
	length   int64 // -1: unknown (chunked or to the close)
	chunked  bool
	close    bool
	location string
}

// readHead reads a response head into scratch (reused from one response to the next) and parses
// it with the epoll engine's parser.
func readHead(r *bufio.Reader, scratch *[]byte, res *response) error {
	b := (*scratch)[:0]
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return err
		}
		if len(bytes.TrimRight(line, "\r\n")) == 0 {
			break
		}
		if b = append(b, line...); len(b) > 64<<10 {
			return errMalformed
		}
	}
	*scratch = b
	var h head
	if err := parseHead(bytes.TrimRight(b, "\r\n"), &h); err != nil {
		return err
	}
	*res = response{status: h.status, length: h.length, chunked: h.chunked, close: h.close, location: string(h.location)}
	if h.chunked {
		res.length = -1
	}
	return nil
}

// readBody discards the body and returns its size.
func readBody(r *bufio.Reader, res *response, head bool) (int64, error) {
	if head || res.status == 204 || res.status == 304 || res.status/100 == 1 {
		return 0, nil
	}
	if res.chunked {
		var total int64
		for {
			line, err := r.ReadSlice('\n')
			if err != nil {
				return total, err
			}
			hexLen, _, _ := bytes.Cut(bytes.TrimRight(line, "\r\n"), []byte(";"))
			n, err := strconv.ParseInt(string(bytes.TrimSpace(hexLen)), 16, 64)
			if err != nil {
				return total, errMalformed
			}
			if n == 0 {
				for { // trailers, then the empty line
					line, err = r.ReadSlice('\n')
					if err != nil {
						return total, err
					}
					if len(bytes.TrimRight(line, "\r\n")) == 0 {
						return total, nil
					}
				}
			}
			d, err := r.Discard(int(n))
			total += int64(d)
			if err != nil {
				return total, err
			}
			if _, err := r.Discard(2); err != nil {
				return total, err
			}
		}
	}
	if res.length < 0 {
		res.close = true
		var total int64
		for {
			d, err := r.Discard(r.Size())
			total += int64(d)
			if err != nil {
				return total, nil // to the close
			}
		}
	}
	d, err := r.Discard(int(res.length))
	return int64(d), err
}

// client is one connection's loop: its own connections (one per host, for redirects) and counts.
type client struct {
	method                   string
	conns                    map[string]*conn
	scratch                  []byte
	lat                      []time.Duration
	req, errs, non2xx, bytes int64
}

func (cl *client) get(addr string) (*conn, error) {
	if c := cl.conns[addr]; c != nil {
		return c, nil
	}
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	c := &conn{c: nc, r: bufio.NewReaderSize(nc, 256<<10)}
	cl.conns[addr] = c
	return c, nil
}

func (cl *client) drop(addr string) {
	if c := cl.conns[addr]; c != nil {
		c.c.Close()
		delete(cl.conns, addr)
	}
}

// exchange sends one request on a kept-alive connection, retrying once on a fresh one when a
// reused connection was closed by the server between requests (as every HTTP client does).
func (cl *client) exchange(t target, head bool, res *response) (int64, error) {
	for attempt := 0; ; attempt++ {
		_, reused := cl.conns[t.addr]
		c, err := cl.get(t.addr)
		if err != nil {
			return 0, err
		}
		if _, err = c.c.Write(t.request); err == nil {
			err = readHead(c.r, &cl.scratch, res)
		}
		if err != nil {
			cl.drop(t.addr)
			if reused && attempt == 0 {
				continue
			}
			return 0, err
		}
		n, err := readBody(c.r, res, head)
		if err != nil || res.close {
			cl.drop(t.addr)
		}
		return n, err
	}
}

// one makes a request and follows up to 5 redirects (GET, no headers but Host: a presigned URL
// carries its own authorisation).
func (cl *client) one(t target) {
	var res response
	t0 := time.Now()
	n, err := cl.exchange(t, cl.method == "HEAD", &res)
	for hops := 0; err == nil && hops < 5 && res.status/100 == 3 && res.location != ""; hops++ {
		var next target
		if next, err = newTarget(res.location, "GET", nil); err != nil {
			break
		}
		n, err = cl.exchange(next, false, &res)
	}
	cl.lat = append(cl.lat, time.Since(t0))
	cl.req++
	cl.bytes += n
	if err != nil {
		cl.errs++
	} else if res.status < 200 || res.status > 299 {
		cl.non2xx++
	}
}

func main() {
	rawURL := flag.String("url", "", "target URL")
	urlFile := flag.String("urlfile", "", "or: a file of URLs, one per line, requested in turn")
	method := flag.String("method", "GET", "GET or HEAD")
	conns := flag.Int("c", 50, "concurrent connections")
	duration := flag.Duration("d", 0, "run for this long")
	total := flag.Int64("n", 0, "or: this many requests in all")
	threads := flag.Int("t", runtime.NumCPU(), "threads of the epoll engine")
	follow := flag.Bool("follow", false, "follow redirects (one goroutine per connection)")
	var hs headers
	flag.Var(&hs, "H", "request header, repeatable")
	flag.Parse()
	urls := []string{*rawURL}
	if *urlFile != "" {
		data, err := os.ReadFile(*urlFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		urls = strings.Fields(string(data))
	}
	if len(urls) == 0 || urls[0] == "" || (*duration == 0 && *total == 0) || (*method != "GET" && *method != "HEAD") {
		fmt.Fprintln(os.Stderr, "usage: loadgen -url URL [-method GET|HEAD] [-c N] (-d DURATION | -n COUNT) [-H 'K: V']")
		os.Exit(2)
	}
	targets := make([]target, len(urls))
	for i, u := range urls {
		t, err := newTarget(u, *method, hs)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		targets[i] = t
	}
	clients := make([]*client, 0, *conns)
	var next int64
	deadline := time.Now().Add(*duration)
	cpu0 := cpuSeconds()
	start := time.Now()
	var wg sync.WaitGroup
	var failure error
	var mu sync.Mutex
	if *follow {
		for w := 0; w < *conns; w++ {
			cl := &client{method: *method, conns: map[string]*conn{}, lat: make([]time.Duration, 0, 1<<16)}
			clients = append(clients, cl)
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				for i := w; ; i += *conns {
					if *total > 0 {
						if atomic.AddInt64(&next, 1) > *total {
							break
						}
					} else if time.Now().After(deadline) {
						break
					}
					cl.one(targets[i%len(targets)])
				}
				for addr := range cl.conns {
					cl.drop(addr)
				}
			}(w)
		}
	} else {
		nt := min(*threads, *conns)
		for k := 0; k < nt; k++ {
			t := &ethread{targets: targets, isHead: *method == "HEAD", next: &next, total: *total, until: deadline, stride: *conns}
			t.stats.lat = make([]time.Duration, 0, 1<<18)
			clients = append(clients, &t.stats)
			var first []int
			for w := k; w < *conns; w += nt {
				first = append(first, w%len(targets))
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				runtime.LockOSThread()
				if err := t.run(first); err != nil {
					mu.Lock()
					failure = err
					mu.Unlock()
				}
			}()
		}
	}
	wg.Wait()
	if failure != nil {
		fmt.Fprintln(os.Stderr, failure)
		os.Exit(1)
	}
	secs := time.Since(start).Seconds()
	cpu := cpuSeconds() - cpu0
	var requests, errs, non2xx, nbytes int64
	var all []time.Duration
	for _, cl := range clients {
		requests, errs, non2xx, nbytes = requests+cl.req, errs+cl.errs, non2xx+cl.non2xx, nbytes+cl.bytes
		all = append(all, cl.lat...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[int(p*float64(len(all)-1))].Microseconds())
	}
	out, _ := json.Marshal(map[string]any{
		"requests": requests, "errors": errs, "non2xx": non2xx, "bytes": nbytes, "seconds": secs,
		"rps": float64(requests) / secs, "mibps": float64(nbytes) / secs / 1048576, "p50us": pct(0.5), "p99us": pct(0.99),
		"cpuSeconds": cpu, "cpuShare": cpu / secs,
	})
	fmt.Println(string(out))
}
