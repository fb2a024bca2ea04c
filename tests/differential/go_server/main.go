// A tracking API on Go's standard library, read the way a Go service reads a request:
// encoding/json decodes the body (whatever its Content-Type) into structs whose fields are
// tagged `json:"registered"`, and matches each key to a field case-insensitively, with Unicode
// folding (`regiſtered` with U+017F, a Kelvin sign for `k`); of duplicates the last wins.
// The query by net/url (`r.URL.Query().Get`: the first value; `;` is no separator), headers by
// `r.Header.Get` (the first value).
//
// Usage: go_server ROUTES_JSON   (prints its port, then serves)
package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
)

type route struct {
	Suffix string   `json:"suffix"`
	JSON   []string `json:"json"`
	Query  []string `json:"query"`
	Header []string `json:"header"`
}

// The bodies this service knows, one struct per identity path.
type eventsBody struct {
	CustomerIDs *struct {
		Registered *string `json:"registered"`
	} `json:"customer_ids"`
}

type batchBody struct {
	Batch []struct {
		UserID *string `json:"userId"`
	} `json:"batch"`
}

type profileBody struct {
	CustomerID *string `json:"customer_id"`
	UserKey    *string `json:"user_key"`
}

// decoders read a body into the values at each identity path it holds.
var decoders = map[string]func(*json.Decoder) (map[string][]string, error){
	"customer_ids.registered": func(d *json.Decoder) (map[string][]string, error) {
		var body eventsBody
		err := d.Decode(&body)
		found := []string{}
		if body.CustomerIDs != nil && body.CustomerIDs.Registered != nil {
			found = append(found, *body.CustomerIDs.Registered)
		}
		return map[string][]string{"customer_ids.registered": found}, err
	},
	"batch[*].userId": func(d *json.Decoder) (map[string][]string, error) {
		var body batchBody
		err := d.Decode(&body)
		found := []string{}
		for _, element := range body.Batch {
			if element.UserID != nil {
				found = append(found, *element.UserID)
			}
		}
		return map[string][]string{"batch[*].userId": found}, err
	},
	"customer_id,user_key": func(d *json.Decoder) (map[string][]string, error) {
		var body profileBody
		err := d.Decode(&body)
		ids, keys := []string{}, []string{}
		if body.CustomerID != nil {
			ids = append(ids, *body.CustomerID)
		}
		if body.UserKey != nil {
			keys = append(keys, *body.UserKey)
		}
		return map[string][]string{"customer_id": ids, "user_key": keys}, err
	},
}

type record struct {
	RequestID         *string             `json:"request_id"`
	Method            string              `json:"method"`
	Path              string              `json:"path"`
	AuthStatus        *string             `json:"auth_status"`
	AuthenticatedUser *string             `json:"authenticated_user"`
	Readings          map[string][]string `json:"readings"`
	Note              *string             `json:"note"`
}

var (
	routes  map[string]route
	mu      sync.Mutex
	records = []record{}
)

func header(r *http.Request, name string) *string {
	if values := r.Header.Values(name); len(values) > 0 {
		return &values[0]
	}
	return nil
}

func decoderKey(paths []string) string {
	sorted := append([]string{}, paths...)
	sort.Strings(sorted)
	return strings.Join(sorted, ",")
}

func track(w http.ResponseWriter, r *http.Request) {
	var current route
	for _, candidate := range routes {
		if strings.HasSuffix(r.URL.Path, candidate.Suffix) {
			current = candidate
		}
	}
	readings := map[string][]string{}
	var note *string
	if len(current.JSON) > 0 {
		found, err := decoders[decoderKey(current.JSON)](json.NewDecoder(r.Body))
		if err != nil {
			// A handler answers 400 to a body it cannot decode: it reads no user from it.
			text := "encoding/json: " + err.Error()
			note = &text
			found = map[string][]string{}
		}
		for _, path := range current.JSON {
			readings["json "+path] = append([]string{}, found[path]...)
		}
	}
	query := r.URL.Query()
	for _, name := range current.Query {
		readings["query "+name] = []string{}
		if query.Has(name) {
			readings["query "+name] = []string{query.Get(name)}
		}
	}
	for _, name := range current.Header {
		readings["header "+name] = []string{}
		if value := header(r, name); value != nil {
			readings["header "+name] = []string{*value}
		}
	}
	mu.Lock()
	records = append(records, record{
		RequestID:         header(r, "X-Request-Id"),
		Method:            r.Method,
		Path:              r.URL.Path,
		AuthStatus:        header(r, "X-Auth-Status"),
		AuthenticatedUser: header(r, "X-Authenticated-User"),
		Readings:          readings,
		Note:              note,
	})
	mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.Write([]byte(`{"success":true}`))
}

func dump(w http.ResponseWriter, r *http.Request) {
	mu.Lock()
	payload, _ := json.Marshal(records)
	mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.Write(payload)
}

func main() {
	if err := json.Unmarshal([]byte(os.Args[1]), &routes); err != nil {
		fmt.Fprintln(os.Stderr, "routes:", err)
		os.Exit(2)
	}
	for name, current := range routes {
		if _, known := decoders[decoderKey(current.JSON)]; len(current.JSON) > 0 && !known {
			fmt.Fprintf(os.Stderr, "route %s: no struct for json paths %v\n", name, current.JSON)
			os.Exit(2)
		}
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(listener.Addr().(*net.TCPAddr).Port)
	mux := http.NewServeMux()
	mux.HandleFunc("/__records", dump)
	mux.HandleFunc("/", track)
	http.Serve(listener, mux)
}
