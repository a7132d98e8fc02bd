package optserve_test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
)

// A TCP proxy between the client and a real `optserve serve` that knows just enough HTTP/1.1 to
// count requests and lose answers: each client connection gets its own upstream connection;
// a rule can let the server answer in full and then close (or reset) the client's connection
// without relaying the answer (the server acted, the client never heard), or answer 503 itself
// as an overloaded gateway would. Nothing imitates the server.

type seenRequest struct {
	Method string
	Path   string
	Header http.Header
	Body   []byte
}

type action int

const (
	dropClose  action = iota // the server answers, the client's connection is closed
	dropReset                // the server answers, the client's connection is reset (RST)
	gateway503               // the proxy answers 503 with Retry-After, the server sees nothing
	gateway429               // the proxy answers 429 rate_limited with Retry-After: 1
)

type rule struct {
	match func(seenRequest) bool
	act   action
}

type proxy struct {
	t        *testing.T
	upstream string
	address  string
	URL      string

	mu       sync.Mutex
	listener net.Listener
	requests []seenRequest
	rules    []rule
	conns    map[net.Conn]bool
}

// newProxy reserves a port; start() begins listening on it (until then it refuses connections).
func newProxy(t *testing.T, upstreamURL string) *proxy {
	t.Helper()
	u, err := url.Parse(upstreamURL)
	if err != nil {
		t.Fatal(err)
	}
	probe, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	address := probe.Addr().String()
	probe.Close()
	p := &proxy{t: t, upstream: u.Host, address: address, URL: "http://" + address, conns: map[net.Conn]bool{}}
	t.Cleanup(p.close)
	return p
}

func startProxy(t *testing.T, upstreamURL string) *proxy {
	p := newProxy(t, upstreamURL)
	if err := p.start(); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *proxy) start() error {
	listener, err := net.Listen("tcp", p.address)
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.listener = listener
	p.mu.Unlock()
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			go p.serve(conn)
		}
	}()
	return nil
}

func (p *proxy) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.listener != nil {
		p.listener.Close()
	}
	for conn := range p.conns {
		conn.Close()
	}
	p.conns = map[net.Conn]bool{}
}

// on makes the next request that matches get act (once).
func (p *proxy) on(match func(seenRequest) bool, act action) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rules = append(p.rules, rule{match, act})
}

// seen lists the requests with this method whose path ends with suffix.
func (p *proxy) seen(method, suffix string) []seenRequest {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []seenRequest
	for _, r := range p.requests {
		if r.Method == method && strings.HasSuffix(r.Path, suffix) {
			out = append(out, r)
		}
	}
	return out
}

func (p *proxy) track(conn net.Conn, on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if on {
		p.conns[conn] = true
	} else {
		delete(p.conns, conn)
	}
}

func (p *proxy) serve(client net.Conn) {
	p.track(client, true)
	defer p.track(client, false)
	defer client.Close()
	upstream, err := net.Dial("tcp", p.upstream)
	if err != nil {
		return
	}
	p.track(upstream, true)
	defer p.track(upstream, false)
	defer upstream.Close()
	fromClient, fromUpstream := bufio.NewReader(client), bufio.NewReader(upstream)
	for {
		req, err := http.ReadRequest(fromClient)
		if err != nil {
			return
		}
		body, err := io.ReadAll(req.Body)
		if err != nil {
			return
		}
		seen := seenRequest{Method: req.Method, Path: req.URL.Path, Header: req.Header.Clone(), Body: body}
		p.mu.Lock()
		p.requests = append(p.requests, seen)
		act := action(-1)
		for i, r := range p.rules {
			if r.match(seen) {
				act = r.act
				p.rules = append(p.rules[:i], p.rules[i+1:]...)
				break
			}
		}
		p.mu.Unlock()

		if act == gateway429 {
			problem := `{"type":"about:blank","title":"Too many requests","status":429,` +
				`"detail":"slow down","code":"rate_limited"}`
			fmt.Fprintf(client, "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/problem+json\r\n"+
				"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s", len(problem), problem)
			continue
		}
		if act == gateway503 {
			problem := `{"type":"about:blank","title":"Service Unavailable","status":503,` +
				`"detail":"the gateway is overloaded","code":"store_unavailable"}`
			fmt.Fprintf(client, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"+
				"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s", len(problem), problem)
			continue
		}
		req.Body = io.NopCloser(bytes.NewReader(body))
		req.ContentLength = int64(len(body))
		req.TransferEncoding = nil
		if err := req.Write(upstream); err != nil {
			return
		}
		resp, err := http.ReadResponse(fromUpstream, req)
		if err != nil {
			return
		}
		answer, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return
		}
		switch act {
		case dropClose:
			return // the server answered in full; the client gets nothing
		case dropReset:
			if tcp, ok := client.(*net.TCPConn); ok {
				_ = tcp.SetLinger(0)
			}
			return
		}
		resp.Body = io.NopCloser(bytes.NewReader(answer))
		resp.ContentLength = int64(len(answer))
		resp.TransferEncoding = nil
		if err := resp.Write(client); err != nil {
			return
		}
	}
}

func isPush(r seenRequest) bool { return r.Method == "POST" && strings.HasSuffix(r.Path, "/gradients") }
