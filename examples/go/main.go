// Command aiwfd-client calls an aiwfd agent with Go's standard library.
//
//	AIWFD_URL=http://127.0.0.1:8080 AIWFD_API_KEY=... \
//	    go run ./examples/go greeter '{"name": "Alice"}'
//
// It prints `data` and the trace on success (exit 0). An error answer of
// aiwfd ({"error": {"type", "message", "details"}, "request_id"}) goes to
// stderr with exit status 1; no answer at all (connection refused, timeout)
// is exit status 2.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

// Usage is trace.usage: tokens summed over every model call.
type Usage struct {
	Prompt     int `json:"prompt"`
	Completion int `json:"completion"`
	Total      int `json:"total"`
}

// Trace is what one agent call took.
type Trace struct {
	StepName  string `json:"step_name"`
	Usage     Usage  `json:"usage"`
	Attempts  int    `json:"attempts"`
	Duration  string `json:"duration"` // Go's own duration format: time.ParseDuration reads it
	Model     string `json:"model"`
	RequestID string `json:"request_id"`
}

// Result is the answer of POST /agent/{name}; Data is the validated output.
type Result struct {
	Data  json.RawMessage `json:"data"`
	Trace Trace           `json:"trace"`
}

// Detail is one problem of an error, e.g. one field of an invalid body.
type Detail struct {
	Path    string `json:"path"`
	Message string `json:"message"`
}

// AgentError is an error answered by aiwfd (or by a proxy in front of it).
type AgentError struct {
	Status     int
	Type       string
	Message    string
	Details    []Detail
	RequestID  string
	RetryAfter string
}

func (e *AgentError) Error() string {
	return fmt.Sprintf("%d %s: %s", e.Status, e.Type, e.Message)
}

// Client calls the agents of one aiwfd server.
type Client struct {
	BaseURL string
	APIKey  string
	HTTP    *http.Client
}

// Call posts body to /agent/{agent} and decodes the answer; an error answer
// is an *AgentError, a transport failure any other error.
func (c *Client) Call(ctx context.Context, agent string, body any) (*Result, error) {
	payload, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost,
		c.BaseURL+"/agent/"+url.PathEscape(agent), bytes.NewReader(payload))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json") // required when a Content-Type is sent
	if c.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+c.APIKey)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		var result Result
		if err := json.Unmarshal(raw, &result); err != nil {
			return nil, fmt.Errorf("unreadable answer: %w", err)
		}
		return &result, nil
	}
	var doc struct {
		Error *struct {
			Type    string   `json:"type"`
			Message string   `json:"message"`
			Details []Detail `json:"details"`
		} `json:"error"`
		RequestID string `json:"request_id"`
	}
	agentErr := &AgentError{Status: resp.StatusCode, RetryAfter: resp.Header.Get("Retry-After")}
	if json.Unmarshal(raw, &doc) == nil && doc.Error != nil {
		agentErr.Type, agentErr.Message, agentErr.Details = doc.Error.Type, doc.Error.Message, doc.Error.Details
		agentErr.RequestID = doc.RequestID
	} else { // not aiwfd's error shape: e.g. an HTML page from a proxy
		text := string(raw)
		if len(text) > 200 {
			text = text[:200]
		}
		agentErr.Type, agentErr.Message = "http_error", strings.TrimSpace(text)
		agentErr.RequestID = resp.Header.Get("X-Request-ID")
	}
	return nil, agentErr
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	agent := "greeter"
	var body any = map[string]any{"name": "Alice"}
	if len(args) > 0 {
		agent = args[0]
	}
	if len(args) > 1 {
		if err := json.Unmarshal([]byte(args[1]), &body); err != nil {
			fmt.Fprintf(os.Stderr, "error: the input is not JSON: %v\n", err)
			return 2
		}
	}
	baseURL := strings.TrimRight(os.Getenv("AIWFD_URL"), "/")
	if baseURL == "" {
		baseURL = "http://127.0.0.1:8080"
	}
	client := &Client{
		BaseURL: baseURL,
		APIKey:  os.Getenv("AIWFD_API_KEY"),
		// Longer than aiwfd's own deadline (55 s by default), so that its
		// answer, even a 504, arrives before the client gives up.
		HTTP: &http.Client{Timeout: 70 * time.Second},
	}
	result, err := client.Call(context.Background(), agent, body)
	var agentErr *AgentError
	if errors.As(err, &agentErr) {
		fmt.Fprintf(os.Stderr, "error: %d %s: %s (request_id %s)\n",
			agentErr.Status, agentErr.Type, agentErr.Message, agentErr.RequestID)
		for _, d := range agentErr.Details {
			path := d.Path
			if path == "" {
				path = "(body)"
			}
			fmt.Fprintf(os.Stderr, "  %s: %s\n", path, d.Message)
		}
		if agentErr.RetryAfter != "" { // 429 and 503 are worth retrying, after this many seconds
			fmt.Fprintf(os.Stderr, "  retry after %s s\n", agentErr.RetryAfter)
		}
		return 1
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: no answer from %s: %v\n", baseURL, err)
		return 2
	}
	t := result.Trace
	fmt.Printf("data: %s\n", result.Data)
	fmt.Printf("trace: step_name=%s attempts=%d tokens=%d duration=%s model=%s request_id=%s\n",
		t.StepName, t.Attempts, t.Usage.Total, t.Duration, t.Model, t.RequestID)
	return 0
}
