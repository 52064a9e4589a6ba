// loadgen: a small HTTP load generator for the ocicache benchmark. Unlike wrk it handles HEAD
// (wrk 4.1 waits for a body after a HEAD and stalls), and it reports latency at microsecond
// resolution, which ab does not. Standard library only.
//
//	loadgen -url URL [-method GET|HEAD] [-c 50] [-d 10s | -n 100] [-H 'Name: value']...
//
// Prints one JSON object: requests, errors, non2xx, bytes, seconds, rps, mibps, p50us, p99us,
// cpuSeconds (its own CPU time during the run).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// cpuSeconds is the CPU time (user + system) this process has used: what receiving costs.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

type headers []string

func (h *headers) String() string     { return strings.Join(*h, ", ") }
func (h *headers) Set(v string) error { *h = append(*h, v); return nil }

func main() {
	url := flag.String("url", "", "target URL")
	urlFile := flag.String("urlfile", "", "or: a file of URLs, one per line, requested in turn")
	method := flag.String("method", "GET", "GET or HEAD")
	conns := flag.Int("c", 50, "concurrent connections")
	duration := flag.Duration("d", 0, "run for this long")
	total := flag.Int("n", 0, "or: this many requests in all")
	var hs headers
	flag.Var(&hs, "H", "request header, repeatable")
	flag.Parse()
	urls := []string{*url}
	if *urlFile != "" {
		data, err := os.ReadFile(*urlFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		urls = strings.Fields(string(data))
	}
	if urls[0] == "" || (*duration == 0 && *total == 0) {
		fmt.Fprintln(os.Stderr, "usage: loadgen -url URL [-method GET|HEAD] [-c N] (-d DURATION | -n COUNT) [-H 'K: V']")
		os.Exit(2)
	}
	transport := &http.Transport{MaxIdleConnsPerHost: *conns, MaxConnsPerHost: *conns, DisableCompression: true}
	client := &http.Client{Transport: transport}
	var requests, errors, non2xx, bytes, next int64
	lat := make([][]time.Duration, *conns)
	deadline := time.Now().Add(*duration)
	cpu0 := cpuSeconds()
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < *conns; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for {
				if *total > 0 {
					if atomic.AddInt64(&next, 1) > int64(*total) {
						return
					}
				} else if time.Now().After(deadline) {
					return
				}
				i := atomic.AddInt64(&requests, 0) + int64(w)
				req, _ := http.NewRequest(*method, urls[int(i)%len(urls)], nil)
				for _, h := range hs {
					k, v, _ := strings.Cut(h, ":")
					req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
				}
				t0 := time.Now()
				res, err := client.Do(req)
				if err != nil {
					atomic.AddInt64(&errors, 1)
					continue
				}
				n, err := io.Copy(io.Discard, res.Body)
				res.Body.Close()
				lat[w] = append(lat[w], time.Since(t0))
				atomic.AddInt64(&requests, 1)
				atomic.AddInt64(&bytes, n)
				if err != nil {
					atomic.AddInt64(&errors, 1)
				}
				if res.StatusCode < 200 || res.StatusCode > 299 {
					atomic.AddInt64(&non2xx, 1)
				}
			}
		}(w)
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	cpu := cpuSeconds() - cpu0
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[int(p*float64(len(all)-1))].Microseconds())
	}
	out, _ := json.Marshal(map[string]any{
		"requests": requests, "errors": errors, "non2xx": non2xx, "bytes": bytes, "seconds": secs,
		"rps": float64(requests) / secs, "mibps": float64(bytes) / secs / 1048576, "p50us": pct(0.5), "p99us": pct(0.99), "cpuSeconds": cpu,
	})
	fmt.Println(string(out))
}
