//go:build linux

package main

import (
	"bytes"
	"errors"
	"net"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// The hot loop's three system calls are made raw: each thread is locked to its OS thread and owns
// its P, so the runtime's hand-off around a blocking call (entersyscall/exitsyscall) is pure cost,
// and measured at about a third of the request rate with two threads.
func rawRead(fd int, p []byte) (int, error) {
	n, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if e != 0 {
		return int(n), e
	}
	return int(n), nil
}

func rawWrite(fd int, p []byte) (int, error) {
	n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if e != 0 {
		return int(n), e
	}
	return int(n), nil
}

func rawEpollWait(epfd int, events []syscall.EpollEvent, msec int) (int, error) {
	n, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), uintptr(msec), 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// The epoll engine drives many connections from each of a few OS threads, as wrk does: one
// epoll_wait wakes a thread for every connection that has bytes, each read takes up to 256 KiB
// into the thread's one buffer, and the next request is written as soon as a response ends. It
// parses Content-Length framing only (what nginx and ocicache send for manifests and blobs); a
// chunked body or a missing length is counted as an error, and redirects are the goroutine
// engine's (-follow).

var errFraming = errors.New("response framing the epoll engine does not parse (chunked, or no length)")

type econn struct {
	fd        int
	sa        syscall.Sockaddr
	ti        int // the target of the request in flight
	head      []byte
	inBody    bool
	remaining int64
	bodyBytes int64
	status    int
	close     bool
	start     time.Time
	active    bool
}

type ethread struct {
	targets []target
	isHead  bool
	epfd    int
	conns   map[int]*econn
	buf     []byte
	stats   client
	next    *int64
	total   int64
	until   time.Time
	stride  int
	active  int
}

func sockaddr(addr string) (syscall.Sockaddr, error) {
	a, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		return nil, err
	}
	if ip4 := a.IP.To4(); ip4 != nil {
		sa := &syscall.SockaddrInet4{Port: a.Port}
		copy(sa.Addr[:], ip4)
		return sa, nil
	}
	sa := &syscall.SockaddrInet6{Port: a.Port}
	copy(sa.Addr[:], a.IP.To16())
	return sa, nil
}

// dial opens a blocking connection, then makes it non-blocking and registers it.
func (t *ethread) dial(c *econn) error {
	domain := syscall.AF_INET
	if _, ok := c.sa.(*syscall.SockaddrInet6); ok {
		domain = syscall.AF_INET6
	}
	fd, err := syscall.Socket(domain, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	if err = syscall.Connect(fd, c.sa); err == nil {
		err = syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	}
	if err == nil {
		err = syscall.SetNonblock(fd, true)
	}
	if err == nil {
		err = syscall.EpollCtl(t.epfd, syscall.EPOLL_CTL_ADD, fd, &syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(fd)})
	}
	if err != nil {
		syscall.Close(fd)
		return err
	}
	c.fd = fd
	t.conns[fd] = c
	return nil
}

func (t *ethread) hangUp(c *econn) {
	syscall.EpollCtl(t.epfd, syscall.EPOLL_CTL_DEL, c.fd, nil)
	syscall.Close(c.fd)
	delete(t.conns, c.fd)
	c.fd = -1
}

// more says whether another request may start, and claims it under -n.
func (t *ethread) more() bool {
	if t.total > 0 {
		return atomic.AddInt64(t.next, 1) <= t.total
	}
	return time.Now().Before(t.until)
}

// send starts the connection's next request, dialling first if it has none.
func (t *ethread) send(c *econn) {
	for {
		if c.fd < 0 {
			if err := t.dial(c); err != nil {
				t.stats.errs++
				t.stats.req++
				if !t.more() {
					t.idle(c)
					return
				}
				continue
			}
		}
		c.ti = (c.ti + t.stride) % len(t.targets)
		c.head, c.inBody, c.bodyBytes, c.remaining = c.head[:0], false, 0, 0
		c.start = time.Now()
		req := t.targets[c.ti].request
		n, err := rawWrite(c.fd, req)
		if err == nil && n == len(req) {
			if !c.active {
				c.active = true
				t.active++
			}
			return
		}
		// A request is far smaller than an empty send buffer: a short write is a broken connection.
		t.hangUp(c)
	}
}

// finish records a response and starts the next request.
func (t *ethread) finish(c *econn, err error) {
	t.stats.lat = append(t.stats.lat, time.Since(c.start))
	t.stats.req++
	t.stats.bytes += c.bodyBytes
	if err != nil {
		t.stats.errs++
	} else if c.status < 200 || c.status > 299 {
		t.stats.non2xx++
	}
	if err != nil || c.close {
		t.hangUp(c)
	}
	if t.more() {
		t.send(c)
	} else {
		t.idle(c)
		if c.fd >= 0 {
			t.hangUp(c)
		}
	}
}

func (t *ethread) idle(c *econn) {
	if c.active {
		c.active = false
		t.active--
	}
}

// parseHead reads the head of a response (without its final CRLF CRLF): status and framing.
func (c *econn) parseHead(b []byte, isHead bool) error {
	var h head
	if err := parseHead(b, &h); err != nil {
		return err
	}
	if h.te {
		return errFraming
	}
	c.status, c.close = h.status, h.close
	switch {
	case isHead || c.status == 204 || c.status == 304:
		c.remaining = 0
	case h.length < 0:
		return errFraming
	default:
		c.remaining = h.length
	}
	return nil
}

var endOfHead = []byte("\r\n\r\n")

// feed takes bytes read from the connection; done reports a whole response. A head that arrives
// whole in one read is parsed in place; only a split one is gathered in c.head.
func (c *econn) feed(data []byte, isHead bool) (done bool, err error) {
	if !c.inBody {
		buf := data
		if len(c.head) > 0 {
			c.head = append(c.head, data...)
			buf = c.head
		}
		end := bytes.Index(buf, endOfHead)
		if end < 0 {
			if len(c.head) == 0 {
				c.head = append(c.head, data...)
			}
			if len(c.head) > 64<<10 {
				return true, errMalformed
			}
			return false, nil
		}
		if err := c.parseHead(buf[:end], isHead); err != nil {
			return true, err
		}
		c.inBody = true
		data = buf[end+4:]
	}
	c.bodyBytes += int64(len(data))
	c.remaining -= int64(len(data))
	if c.remaining < 0 {
		return true, errMalformed
	}
	return c.remaining == 0, nil
}

func (t *ethread) run(first []int) error {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return err
	}
	defer syscall.Close(epfd)
	t.epfd, t.conns, t.buf = epfd, map[int]*econn{}, make([]byte, 256<<10)
	var all []*econn
	for _, ti := range first {
		sa, err := sockaddr(t.targets[ti].addr)
		if err != nil {
			return err
		}
		c := &econn{fd: -1, sa: sa, ti: (ti - t.stride%len(t.targets) + len(t.targets)) % len(t.targets)}
		all = append(all, c)
		if t.more() {
			t.send(c)
		}
	}
	events := make([]syscall.EpollEvent, 256)
	for {
		if t.active == 0 {
			return nil
		}
		if t.total == 0 && time.Now().After(t.until) {
			for _, c := range all { // in flight at the deadline: abandoned, as wrk does
				if c.fd >= 0 {
					t.hangUp(c)
				}
			}
			return nil
		}
		n, err := rawEpollWait(epfd, events, 50)
		if err != nil && err != syscall.EINTR {
			return err
		}
		for i := 0; i < n; i++ {
			c := t.conns[int(events[i].Fd)]
			if c == nil {
				continue
			}
			r, err := rawRead(c.fd, t.buf)
			if err == syscall.EAGAIN {
				continue
			}
			if err != nil || r == 0 {
				if err == nil {
					err = errors.New("connection closed")
				}
				t.finish(c, err)
				continue
			}
			if done, err := c.feed(t.buf[:r], t.isHead); done {
				t.finish(c, err)
			}
		}
	}
}
