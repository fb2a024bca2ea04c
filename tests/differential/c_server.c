/* A tracking API in C on cJSON, read the way a small C service reads a request.
 *
 * The body goes to cJSON_Parse as a C string (so it ends at a NUL byte, and whatever follows
 * the first JSON value is ignored). Keys are looked up with cJSON_GetObjectItem, the lookup
 * cJSON's own examples and most callers use: it compares keys as C strings (a key written
 * "registered\u0000..." reads as "registered") and case-insensitively in ASCII, and returns the
 * first of duplicate keys. Only string values are read as a user. The query is split on `&`
 * and percent-decoded (`+` is a space), the first value wins; headers are matched
 * case-insensitively, the first one wins. Keep-alive: bytes after a request's Content-Length
 * are the next request.
 *
 * Usage: c_server ROUTES_JSON   (prints its port, then serves; one thread per connection)
 */
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <ctype.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_HEADERS 100
#define MAX_REQUEST (4 * 1024 * 1024)

static cJSON *routes;
static cJSON *records;
static pthread_mutex_t records_lock = PTHREAD_MUTEX_INITIALIZER;

struct request {
    char *method, *target, *path, *query;
    char *names[MAX_HEADERS], *values[MAX_HEADERS];
    int header_count;
    char *body;
    size_t body_length;
};

static const char *header(const struct request *request, const char *name) {
    for (int i = 0; i < request->header_count; i++) {
        if (strcasecmp(request->names[i], name) == 0) return request->values[i];
    }
    return NULL;
}

static int hex(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    c = tolower(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Percent-decodes `text[0:length]` into a new C string. */
static char *url_decode(const char *text, size_t length) {
    char *out = malloc(length + 1), *o = out;
    for (size_t i = 0; i < length; i++) {
        if (text[i] == '+') {
            *o++ = ' ';
        } else if (text[i] == '%' && i + 2 < length && hex(text[i + 1]) >= 0 &&
                   hex(text[i + 2]) >= 0) {
            *o++ = (char)(hex(text[i + 1]) * 16 + hex(text[i + 2]));
            i += 2;
        } else {
            *o++ = text[i];
        }
    }
    *o = '\0';
    return out;
}

/* The first value of query parameter `name`, or NULL. */
static char *query_value(const char *query, const char *name) {
    const char *p = query;
    while (p && *p) {
        const char *end = strchr(p, '&');
        size_t length = end ? (size_t)(end - p) : strlen(p);
        const char *equals = memchr(p, '=', length);
        size_t name_length = equals ? (size_t)(equals - p) : length;
        char *decoded = url_decode(p, name_length);
        int match = strcmp(decoded, name) == 0;
        free(decoded);
        if (match) {
            return equals ? url_decode(equals + 1, length - name_length - 1) : strdup("");
        }
        p = end ? end + 1 : NULL;
    }
    return NULL;
}

/* Adds every string at `path` (keys separated by `.`, `[*]` for each array element). */
static void walk(cJSON *node, const char *path, cJSON *found) {
    if (node == NULL) return;
    if (*path == '\0') {
        if (cJSON_IsString(node) && node->valuestring != NULL) {
            cJSON_AddItemToArray(found, cJSON_CreateString(node->valuestring));
        }
        return;
    }
    const char *dot = strchr(path, '.');
    size_t length = dot ? (size_t)(dot - path) : strlen(path);
    char key[256];
    if (length >= sizeof key) return;
    memcpy(key, path, length);
    key[length] = '\0';
    const char *rest = dot ? dot + 1 : "";
    int star = length > 3 && strcmp(key + length - 3, "[*]") == 0;
    if (star) key[length - 3] = '\0';
    cJSON *child = cJSON_GetObjectItem(node, key);
    if (!star) {
        walk(child, rest, found);
    } else if (cJSON_IsArray(child)) {
        cJSON *element;
        cJSON_ArrayForEach(element, child) { walk(element, rest, found); }
    }
}

static cJSON *nullable(const char *text) {
    return text ? cJSON_CreateString(text) : cJSON_CreateNull();
}

static void send_json(int fd, const char *payload) {
    size_t length = strlen(payload);
    char *answer = malloc(length + 256);
    int n = snprintf(answer, 256,
                     "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n",
                     length);
    memcpy(answer + n, payload, length);
    /* One write: a head and a body written apart wait on Nagle and delayed ACKs. */
    if (write(fd, answer, (size_t)n + length) < 0) perror("write");
    free(answer);
}

static void track(int fd, struct request *request) {
    cJSON *route = NULL, *candidate;
    cJSON_ArrayForEach(candidate, routes) {
        const char *suffix = cJSON_GetObjectItemCaseSensitive(candidate, "suffix")->valuestring;
        size_t path_length = strlen(request->path), suffix_length = strlen(suffix);
        if (path_length >= suffix_length &&
            strcmp(request->path + path_length - suffix_length, suffix) == 0) {
            route = candidate;
        }
    }
    cJSON *readings = cJSON_CreateObject(), *item;
    cJSON *json_paths = cJSON_GetObjectItemCaseSensitive(route, "json");
    if (cJSON_GetArraySize(json_paths) > 0) {
        char *text = malloc(request->body_length + 1);
        memcpy(text, request->body, request->body_length);
        text[request->body_length] = '\0';
        cJSON *document = cJSON_Parse(text);
        cJSON_ArrayForEach(item, json_paths) {
            char place[300];
            snprintf(place, sizeof place, "json %s", item->valuestring);
            cJSON *found = cJSON_CreateArray();
            walk(document, item->valuestring, found);
            cJSON_AddItemToObject(readings, place, found);
        }
        cJSON_Delete(document);
        free(text);
    }
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(route, "query")) {
        char place[300];
        snprintf(place, sizeof place, "query %s", item->valuestring);
        cJSON *found = cJSON_CreateArray();
        char *value = query_value(request->query, item->valuestring);
        if (value) cJSON_AddItemToArray(found, cJSON_CreateString(value));
        free(value);
        cJSON_AddItemToObject(readings, place, found);
    }
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(route, "header")) {
        char place[300];
        snprintf(place, sizeof place, "header %s", item->valuestring);
        cJSON *found = cJSON_CreateArray();
        const char *value = header(request, item->valuestring);
        if (value) cJSON_AddItemToArray(found, cJSON_CreateString(value));
        cJSON_AddItemToObject(readings, place, found);
    }
    cJSON *record = cJSON_CreateObject();
    cJSON_AddItemToObject(record, "request_id", nullable(header(request, "X-Request-Id")));
    cJSON_AddStringToObject(record, "method", request->method);
    cJSON_AddStringToObject(record, "path", request->path);
    cJSON_AddItemToObject(record, "auth_status", nullable(header(request, "X-Auth-Status")));
    cJSON_AddItemToObject(record, "authenticated_user",
                          nullable(header(request, "X-Authenticated-User")));
    cJSON_AddItemToObject(record, "readings", readings);
    cJSON_AddNullToObject(record, "note");
    pthread_mutex_lock(&records_lock);
    cJSON_AddItemToArray(records, record);
    pthread_mutex_unlock(&records_lock);
    send_json(fd, "{\"success\":true}");
}

static void dump(int fd) {
    pthread_mutex_lock(&records_lock);
    char *payload = cJSON_PrintUnformatted(records);
    pthread_mutex_unlock(&records_lock);
    send_json(fd, payload);
    free(payload);
}

/* Parses one request head in place; returns 0 if it is not one. */
static int parse_head(char *head, struct request *request) {
    char *line_end = strstr(head, "\r\n");
    *line_end = '\0';
    request->method = strtok(head, " ");
    request->target = strtok(NULL, " ");
    if (!request->method || !request->target) return 0;
    request->path = request->target;
    char *question = strchr(request->target, '?');
    request->query = question ? question + 1 : "";
    if (question) *question = '\0';
    request->header_count = 0;
    char *line = line_end + 2;
    while (*line && request->header_count < MAX_HEADERS) {
        char *end = strstr(line, "\r\n");
        if (end) *end = '\0';
        char *colon = strchr(line, ':');
        if (colon) {
            *colon = '\0';
            char *value = colon + 1;
            while (*value == ' ' || *value == '\t') value++;
            char *tail = value + strlen(value);
            while (tail > value && (tail[-1] == ' ' || tail[-1] == '\t')) *--tail = '\0';
            request->names[request->header_count] = line;
            request->values[request->header_count++] = value;
        }
        if (!end) break;
        line = end + 2;
    }
    return 1;
}

static void *serve(void *argument) {
    int fd = (int)(long)argument;
    char *buffer = malloc(MAX_REQUEST);
    size_t used = 0;
    for (;;) {
        char *head_end;
        buffer[used] = '\0';
        while ((head_end = strstr(buffer, "\r\n\r\n")) == NULL) {
            if (used >= MAX_REQUEST - 1) goto done;
            ssize_t n = read(fd, buffer + used, MAX_REQUEST - 1 - used);
            if (n <= 0) goto done;
            used += (size_t)n;
            buffer[used] = '\0';
        }
        size_t head_length = (size_t)(head_end - buffer) + 4;
        char *head = malloc(head_length + 1);
        memcpy(head, buffer, head_length);
        head[head_length] = '\0';
        struct request request;
        if (!parse_head(head, &request)) {
            free(head);
            goto done;
        }
        const char *length_text = header(&request, "Content-Length");
        size_t body_length = length_text ? strtoul(length_text, NULL, 10) : 0;
        if (header(&request, "Transfer-Encoding") || head_length + body_length >= MAX_REQUEST) {
            free(head);
            goto done;
        }
        while (used < head_length + body_length) {
            ssize_t n = read(fd, buffer + used, MAX_REQUEST - 1 - used);
            if (n <= 0) {
                free(head);
                goto done;
            }
            used += (size_t)n;
        }
        request.body = buffer + head_length;
        request.body_length = body_length;
        if (strcmp(request.target, "/__records") == 0) {
            dump(fd);
        } else {
            track(fd, &request);
        }
        const char *connection = header(&request, "Connection");
        int close_after = connection && strcasecmp(connection, "close") == 0;
        free(head);
        memmove(buffer, buffer + head_length + body_length, used - head_length - body_length);
        used -= head_length + body_length;
        if (close_after) break;
    }
done:
    free(buffer);
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    routes = cJSON_Parse(argc > 1 ? argv[1] : "{}");
    records = cJSON_CreateArray();
    if (routes == NULL) {
        fprintf(stderr, "routes: not JSON\n");
        return 2;
    }
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = 0};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t size = sizeof address;
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 ||
        listen(listener, 128) != 0 ||
        getsockname(listener, (struct sockaddr *)&address, &size) != 0) {
        perror("listen");
        return 1;
    }
    printf("%d\n", ntohs(address.sin_port));
    fflush(stdout);
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) continue;
        pthread_t thread;
        pthread_create(&thread, NULL, serve, (void *)(long)fd);
        pthread_detach(thread);
    }
}
