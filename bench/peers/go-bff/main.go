// A hand-written backend-for-frontend, written the way a Go team would:
// the standard library only, typed structs for the three backend documents
// and the answer, one goroutine per backend call, one shared http.Transport
// keeping enough idle connections per backend for 64 concurrent clients.
// It serves the same dashboard as Manifold's composition in
// bench/compose.sh and bench/peers/node-bff: three backend calls in
// parallel, the user call required, the others optional, the same reshaped
// JSON and the same cache-control header.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

type User struct {
	ID       *int64  `json:"id"`
	Name     *string `json:"name"`
	Email    *string `json:"email"`
	SellerID *int64  `json:"seller_id"`
	Tier     *string `json:"tier"`
}

type Order struct {
	ID        string  `json:"id"`
	Total     float64 `json:"total"`
	Status    string  `json:"status"`
	ProductID string  `json:"product_id"`
}

type Orders struct {
	UserID string  `json:"user_id"`
	Items  []Order `json:"items"`
}

type Review struct {
	ProductID string `json:"product_id"`
	Stars     int    `json:"stars"`
	Text      string `json:"text"`
}

type Reviews struct {
	UserID  string   `json:"user_id"`
	Items   []Review `json:"items"`
	Average *float64 `json:"average"`
}

// Dashboard is the answer; nil fields are JSON null, as in the Node BFF.
type Dashboard struct {
	ID     *int64   `json:"id"`
	Name   *string  `json:"name"`
	Tier   *string  `json:"tier"`
	Orders []Order  `json:"orders"`
	Rating *float64 `json:"rating"`
}

type apiError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

var client = &http.Client{Transport: &http.Transport{
	DialContext:         (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
	MaxIdleConns:        1024,
	MaxIdleConnsPerHost: 256, // above the 64 concurrent clients of the benchmark
	IdleConnTimeout:     90 * time.Second,
}}

func getJSON(ctx context.Context, u string, into any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		_, _ = io.Copy(io.Discard, resp.Body)
		return fmt.Errorf("backend status %d", resp.StatusCode)
	}
	err = json.NewDecoder(resp.Body).Decode(into)
	// Read to the end so the connection goes back to the pool.
	_, _ = io.Copy(io.Discard, resp.Body)
	return err
}

func main() {
	port := os.Getenv("PORT")
	if port == "" {
		port = "18113"
	}
	users, orders, reviews := os.Getenv("USERS_URL"), os.Getenv("ORDERS_URL"), os.Getenv("REVIEWS_URL")

	http.HandleFunc("/v1/users/", func(w http.ResponseWriter, r *http.Request) {
		rest := strings.TrimPrefix(r.URL.Path, "/v1/users/")
		id := strings.TrimSuffix(rest, "/dashboard")
		if r.Method != http.MethodGet || id == rest || id == "" || strings.Contains(id, "/") {
			http.NotFound(w, r)
			return
		}
		id = url.PathEscape(id)
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()

		var user User
		var ord Orders
		var rev Reviews
		var userErr, ordErr, revErr error
		var wg sync.WaitGroup
		wg.Add(3)
		go func() { defer wg.Done(); userErr = getJSON(ctx, users+"/users/"+id, &user) }()
		go func() { defer wg.Done(); ordErr = getJSON(ctx, orders+"/orders?user="+id+"&limit=5", &ord) }()
		go func() { defer wg.Done(); revErr = getJSON(ctx, reviews+"/reviews?user="+id, &rev) }()
		wg.Wait()

		w.Header().Set("content-type", "application/json; charset=utf-8")
		if userErr != nil {
			var e apiError
			e.Error.Code, e.Error.Message = "upstream_error", `call "user" failed`
			body, _ := json.Marshal(e)
			w.WriteHeader(http.StatusBadGateway)
			_, _ = w.Write(body)
			return
		}
		answer := Dashboard{ID: user.ID, Name: user.Name, Tier: user.Tier}
		if ordErr == nil {
			answer.Orders = ord.Items
		}
		if revErr == nil {
			answer.Rating = rev.Average
		}
		body, err := json.Marshal(answer)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("cache-control", "private, max-age=10")
		_, _ = w.Write(body)
	})

	srv := &http.Server{Addr: "127.0.0.1:" + port, ReadHeaderTimeout: 10 * time.Second}
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
}
