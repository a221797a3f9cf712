// Command naive-opamp is the plain OpAMP server that opamp-gitops is
// benchmarked against: opamp-go's server package used the way its tutorial
// does. Connections live in a mutex-guarded map; POST /trigger makes a config
// current and sends it to every WebSocket connection; plain-HTTP agents get it
// in the reply to their next poll. GET /stats says how many agents are
// connected and how many have APPLIED the current config.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/open-telemetry/opamp-go/protobufs"
	"github.com/open-telemetry/opamp-go/server"
	"github.com/open-telemetry/opamp-go/server/types"
)

const capabilities = uint64(protobufs.ServerCapabilities_ServerCapabilities_AcceptsStatus |
	protobufs.ServerCapabilities_ServerCapabilities_OffersRemoteConfig |
	protobufs.ServerCapabilities_ServerCapabilities_AcceptsEffectiveConfig)

// agent is what the server remembers of one agent, by instance uid.
type agent struct {
	conn         types.Connection // nil for plain HTTP
	capabilities uint64
	status       *protobufs.RemoteConfigStatus
}

func (a *agent) applied(hash []byte) bool {
	return a.status != nil && a.status.Status == protobufs.RemoteConfigStatuses_RemoteConfigStatuses_APPLIED &&
		bytes.Equal(a.status.LastRemoteConfigHash, hash)
}

// needs says whether the agent should be sent config: it accepts remote
// config and has not reported the hash yet.
func (a *agent) needs(config *protobufs.AgentRemoteConfig) bool {
	accepts := a.capabilities&uint64(protobufs.AgentCapabilities_AgentCapabilities_AcceptsRemoteConfig) != 0
	return config != nil && accepts && (a.status == nil || !bytes.Equal(a.status.LastRemoteConfigHash, config.ConfigHash))
}

type fleet struct {
	mu     sync.Mutex
	conns  map[types.Connection]string // WebSocket connection → instance uid
	agents map[string]*agent
	config *protobufs.AgentRemoteConfig // the current config, nil before the first trigger

	messages atomic.Int64
	errors   atomic.Int64
}

func newFleet() *fleet {
	return &fleet{conns: map[types.Connection]string{}, agents: map[string]*agent{}}
}

// callbacks answers every connection; ws tells WebSocket from plain HTTP,
// whose "connection" lasts one request.
func (f *fleet) callbacks(ws bool) types.ConnectionCallbacks {
	cb := types.ConnectionCallbacks{
		OnMessage: func(_ context.Context, conn types.Connection, msg *protobufs.AgentToServer) *protobufs.ServerToAgent {
			if !ws {
				conn = nil
			}
			return f.onMessage(conn, msg)
		},
		OnReadMessageError: func(_ types.Connection, messageType int, _ []byte, _ error) {
			// A failed read (messageType -1) is the connection ending, closed
			// by the agent or not; only a message that came in and could not
			// be decoded is an error.
			if messageType != -1 {
				f.errors.Add(1)
			}
		},
		OnMessageResponseError: func(types.Connection, *protobufs.ServerToAgent, error) {
			f.errors.Add(1)
		},
	}
	if ws {
		cb.OnConnectionClose = f.onClose
	}
	return cb
}

func (f *fleet) onMessage(conn types.Connection, msg *protobufs.AgentToServer) *protobufs.ServerToAgent {
	f.messages.Add(1)
	uid := string(msg.InstanceUid)
	reply := &protobufs.ServerToAgent{InstanceUid: msg.InstanceUid, Capabilities: capabilities}

	f.mu.Lock()
	defer f.mu.Unlock()
	a, known := f.agents[uid]
	if !known {
		a = &agent{}
		f.agents[uid] = a
		if msg.AgentDescription == nil {
			// A server that lost its memory of the agent asks for all of it.
			reply.Flags = uint64(protobufs.ServerToAgentFlags_ServerToAgentFlags_ReportFullState)
		}
	}
	if conn != nil {
		a.conn = conn
		f.conns[conn] = uid
	}
	a.capabilities = msg.Capabilities
	if msg.RemoteConfigStatus != nil {
		a.status = msg.RemoteConfigStatus
	}
	if msg.AgentDisconnect != nil {
		delete(f.agents, uid)
		return reply
	}
	if a.needs(f.config) {
		reply.RemoteConfig = f.config
	}
	return reply
}

func (f *fleet) onClose(conn types.Connection) {
	f.mu.Lock()
	defer f.mu.Unlock()
	uid := f.conns[conn]
	delete(f.conns, conn)
	if a := f.agents[uid]; a != nil && a.conn == conn {
		delete(f.agents, uid)
	}
}

// trigger makes body the current config and sends it to every WebSocket
// agent that does not have it; it returns the hash and how many were sent.
func (f *fleet) trigger(body []byte) (string, int) {
	sum := sha256.Sum256(body)
	config := &protobufs.AgentRemoteConfig{
		Config: &protobufs.AgentConfigMap{ConfigMap: map[string]*protobufs.AgentConfigFile{
			"": {Body: body, ContentType: "text/yaml"},
		}},
		ConfigHash: sum[:],
	}
	type target struct {
		conn types.Connection
		uid  string
	}
	var targets []target
	f.mu.Lock()
	f.config = config
	for conn, uid := range f.conns {
		if a := f.agents[uid]; a != nil && a.needs(config) {
			targets = append(targets, target{conn, uid})
		}
	}
	f.mu.Unlock()

	sent := 0
	for _, t := range targets {
		msg := &protobufs.ServerToAgent{InstanceUid: []byte(t.uid), Capabilities: capabilities, RemoteConfig: config}
		if err := t.conn.Send(context.Background(), msg); err != nil {
			f.errors.Add(1)
			continue
		}
		sent++
	}
	return hex.EncodeToString(sum[:]), sent
}

type stats struct {
	Connected     int    `json:"connected"`
	ConnectedWS   int    `json:"connected_ws"`
	ConnectedHTTP int    `json:"connected_http"`
	Applied       int    `json:"applied"`
	ConfigHash    string `json:"config_hash"`
	Messages      int64  `json:"messages"`
	Errors        int64  `json:"errors"`
}

func (f *fleet) stats() stats {
	s := stats{Messages: f.messages.Load(), Errors: f.errors.Load()}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.config != nil {
		s.ConfigHash = hex.EncodeToString(f.config.ConfigHash)
	}
	for _, a := range f.agents {
		if a.conn != nil {
			s.ConnectedWS++
		} else {
			s.ConnectedHTTP++
		}
		if f.config != nil && a.applied(f.config.ConfigHash) {
			s.Applied++
		}
	}
	s.Connected = s.ConnectedWS + s.ConnectedHTTP
	return s
}

func (f *fleet) api() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /trigger", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		hash, sent := f.trigger(body)
		writeJSON(w, map[string]any{"config_hash": hash, "sent": sent})
	})
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, f.stats())
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(v); err != nil {
		log.Printf("writing a reply: %v", err)
	}
}

func main() {
	opampListen := flag.String("opamp-listen", "127.0.0.1:4320", "where agents connect (/v1/opamp, WebSocket and plain HTTP)")
	apiListen := flag.String("api-listen", "127.0.0.1:4321", "where POST /trigger and GET /stats listen")
	flag.Parse()

	f := newFleet()
	wsCallbacks, httpCallbacks := f.callbacks(true), f.callbacks(false)
	srv := server.New(nil)
	err := srv.Start(server.StartSettings{
		ListenEndpoint: *opampListen,
		Settings: server.Settings{Callbacks: types.Callbacks{
			OnConnecting: func(r *http.Request) types.ConnectionResponse {
				// opamp-go serves plain HTTP for this content type and upgrades anything else.
				if r.Header.Get("Content-Type") == "application/x-protobuf" {
					return types.ConnectionResponse{Accept: true, ConnectionCallbacks: httpCallbacks}
				}
				return types.ConnectionResponse{Accept: true, ConnectionCallbacks: wsCallbacks}
			},
		}},
	})
	if err != nil {
		log.Fatalf("starting the OpAMP server: %v", err)
	}
	api := &http.Server{Addr: *apiListen, Handler: f.api(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := api.ListenAndServe(); err != http.ErrServerClosed {
			log.Fatalf("API: %v", err)
		}
	}()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = api.Shutdown(ctx)
	_ = srv.Stop(ctx)
}
