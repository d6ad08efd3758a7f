/* Instant HTTP/1.1 responders for bench/suite.py (compiled by the harness with gcc into bench/build/).
 *
 *   responder backend PORT NAME [PORT NAME ...]
 *       The mock LLM backend: one listener per (127.0.0.1:PORT, NAME), all in one epoll loop. Every request gets a
 *       canned OpenAI chat completion (JSON, content-length) or, when its body has "stream": true, a canned SSE
 *       stream (chunked, one event per chunk, usage before [DONE]). Both carry NAME in x-mock-backend and in the
 *       completion id, so the harness can check that a request reached the backend its model routes to.
 *   responder route SOCKET_PATH
 *       The httpCall floor's "sidecar" on a Unix socket: answers each request with the value of the body's
 *       "model" key (text/plain), or a 400 if there is none. No allocation, no parsing beyond that scan.
 *   responder ipc SOCKET_PATH
 *       An instant ipc_router sidecar for ipc_router's real Lua filter: POST /route gets the msgpack answer
 *       {"set": {model, route and backend headers = the model found in the request, original path}, "id"},
 *       anything else (/complete) a 204. Isolates the filter's Envoy-side cost from the Python sidecar's.
 *
 * Written in C, not Python, so that the backend and the responder cost next to nothing beside Envoy: the suite
 * measures Envoy's filters, not its mock. Keep-alive and pipelining; one thread; exits on SIGTERM/SIGINT.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <arpa/inet.h>

#define MAX_LISTEN 16
#define MAX_EVENTS 64

typedef struct { char *p; size_t len, cap; } buf_t;
typedef struct { int fd; int listener; int name; buf_t in, out; size_t out_off; } conn_t;

static int route_mode;  /* 0 backend, 1 route, 2 ipc */
static int nlisten;
static int listen_fd[MAX_LISTEN];
static buf_t answer_json[MAX_LISTEN], answer_sse[MAX_LISTEN];
static volatile sig_atomic_t stopping;

static void die(const char *what) { perror(what); exit(1); }

static void put(buf_t *b, const char *s, size_t n) {
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 4096;
        b->p = realloc(b->p, b->cap);
        if (!b->p) die("realloc");
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}
static void puts_(buf_t *b, const char *s) { put(b, s, strlen(s)); }

static void build_answers(int i, const char *name) {
    char body[1024], head[256], ev[1024];
    int n = snprintf(body, sizeof body,
        "{\"id\":\"chatcmpl-%s\",\"object\":\"chat.completion\",\"created\":1755137933,\"model\":\"%s\","
        "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Hello! How can I help you today?\"},"
        "\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":412,\"completion_tokens\":9,\"total_tokens\":421}}",
        name, name);
    int h = snprintf(head, sizeof head,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-mock-backend: %s\r\ncontent-length: %d\r\n\r\n", name, n);
    put(&answer_json[i], head, h);
    put(&answer_json[i], body, n);

    h = snprintf(head, sizeof head,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-mock-backend: %s\r\ntransfer-encoding: chunked\r\n\r\n",
        name);
    put(&answer_sse[i], head, h);
    static const char *words[] = {"Hello", "!", " How", " can", " I", " help", "?"};
    for (int k = -1; k < 10; k++) {
        if (k == -1)
            n = snprintf(body, sizeof body, "data: {\"id\":\"chatcmpl-%s\",\"object\":\"chat.completion.chunk\",\"model\":\"%s\","
                "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n", name, name);
        else if (k < 7)
            n = snprintf(body, sizeof body, "data: {\"id\":\"chatcmpl-%s\",\"object\":\"chat.completion.chunk\",\"model\":\"%s\","
                "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"%s\"},\"finish_reason\":null}],\"usage\":null}\n\n", name, name, words[k]);
        else if (k == 7)
            n = snprintf(body, sizeof body, "data: {\"id\":\"chatcmpl-%s\",\"object\":\"chat.completion.chunk\",\"model\":\"%s\","
                "\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n", name, name);
        else if (k == 8)
            n = snprintf(body, sizeof body, "data: {\"id\":\"chatcmpl-%s\",\"object\":\"chat.completion.chunk\",\"model\":\"%s\","
                "\"choices\":[],\"usage\":{\"prompt_tokens\":412,\"completion_tokens\":7,\"total_tokens\":419}}\n\n", name, name);
        else
            n = snprintf(body, sizeof body, "data: [DONE]\n\n");
        h = snprintf(ev, sizeof ev, "%x\r\n", n);
        put(&answer_sse[i], ev, h);
        put(&answer_sse[i], body, n);
        puts_(&answer_sse[i], "\r\n");
    }
    puts_(&answer_sse[i], "0\r\n\r\n");
}

/* Length of the first whole request in p[0..len), or 0 if it is not all there yet; body/blen point into it. */
static size_t request_length(const char *p, size_t len, const char **body, size_t *blen) {
    const char *end = memmem(p, len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end - p) + 4, clen = 0;
    int chunked = 0;
    for (const char *line = memchr(p, '\n', head); line && line + 1 < end; line = memchr(line + 1, '\n', end - line)) {
        const char *l = line + 1;
        if (strncasecmp(l, "content-length:", 15) == 0) clen = strtoul(l + 15, NULL, 10);
        else if (strncasecmp(l, "transfer-encoding:", 18) == 0) chunked = memmem(l, end - l, "chunked", 7) != NULL;
    }
    *body = p + head;
    if (chunked) {  /* the body is not read, only skipped: find the last chunk */
        const char *last = head + 2 <= len ? memmem(p + head - 2, len - head + 2, "\r\n0\r\n\r\n", 7) : NULL;
        if (!last) return 0;
        *blen = (size_t)(last - *body);
        return (size_t)(last - p) + 7;
    }
    *blen = clen;
    return head + clen <= len ? head + clen : 0;
}

static void put_str(buf_t *b, const char *s, size_t n) {  /* a msgpack fixstr (n < 32) */
    char h = (char)(0xa0 | n);
    put(b, &h, 1);
    put(b, s, n);
}

static void ipc_answer(conn_t *c, const char *model, size_t n) {
    static const char *keys[] = {"x-ai-eg-model", "x-ai-eg-selected-route", "x-ai-eg-selected-backend"};
    buf_t m = {0};
    put(&m, "\x82", 1);
    put_str(&m, "set", 3);
    put(&m, "\x84", 1);
    for (int i = 0; i < 3; i++) {
        put_str(&m, keys[i], strlen(keys[i]));
        put_str(&m, model, n);
    }
    put_str(&m, "x-ai-eg-original-path", 21);
    put_str(&m, "/v1/chat/completions", 20);
    put_str(&m, "id", 2);
    put_str(&m, "bench-1", 7);
    char head[128];
    int h = snprintf(head, sizeof head,
                     "HTTP/1.1 200 OK\r\ncontent-type: application/msgpack\r\ncontent-length: %zu\r\n\r\n", m.len);
    put(&c->out, head, h);
    put(&c->out, m.p, m.len);
    free(m.p);
}

static void answer(conn_t *c, const char *req, const char *body, size_t blen) {
    if (route_mode == 2 && strncmp(req, "POST /route ", 12) != 0) {
        puts_(&c->out, "HTTP/1.1 204 No Content\r\n\r\n");
        return;
    }
    if (!route_mode) {
        int sse = memmem(body, blen, "\"stream\":true", 13) || memmem(body, blen, "\"stream\": true", 14);
        buf_t *a = sse ? &answer_sse[c->name] : &answer_json[c->name];
        put(&c->out, a->p, a->len);
        return;
    }
    const char *k = memmem(body, blen, "\"model\"", 7), *e = body + blen;
    if (k) {
        k += 7;
        while (k < e && (*k == ' ' || *k == ':')) k++;
        if (k < e && *k == '"') {
            const char *v = ++k;
            while (k < e && *k != '"') k++;
            if (k < e && route_mode == 2 && k - v < 32) {
                ipc_answer(c, v, (size_t)(k - v));
                return;
            }
            if (k < e && route_mode == 1) {
                char head[128];
                int h = snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n",
                                 (int)(k - v));
                put(&c->out, head, h);
                put(&c->out, v, k - v);
                return;
            }
        }
    }
    puts_(&c->out, "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 8\r\n\r\nno model");
}

static void close_conn(conn_t *c) {
    close(c->fd);
    free(c->in.p);
    free(c->out.p);
    free(c);
}

/* Write what is pending; 1 when all of it went, 0 when the socket is full, -1 on error. */
static int flush(conn_t *c) {
    while (c->out_off < c->out.len) {
        ssize_t n = write(c->fd, c->out.p + c->out_off, c->out.len - c->out_off);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        c->out_off += (size_t)n;
    }
    c->out.len = c->out_off = 0;
    return 1;
}

static int on_readable(int ep, conn_t *c) {
    char chunk[65536];
    for (;;) {
        ssize_t n = read(c->fd, chunk, sizeof chunk);
        if (n == 0) return -1;
        if (n < 0) {
            if (errno == EAGAIN) break;
            return -1;
        }
        put(&c->in, chunk, (size_t)n);
    }
    size_t off = 0, used;
    const char *body;
    size_t blen;
    while ((used = request_length(c->in.p + off, c->in.len - off, &body, &blen)) > 0) {
        answer(c, c->in.p + off, body, blen);
        off += used;
    }
    memmove(c->in.p, c->in.p + off, c->in.len - off);
    c->in.len -= off;
    int r = flush(c);
    if (r == 0) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    }
    return r < 0 ? -1 : 0;
}

static int listen_tcp(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    if (fd < 0) die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(fd, 1024) < 0) die("listen");
    return fd;
}

static int listen_unix(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) die("socket");
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) { fprintf(stderr, "socket path too long\n"); exit(2); }
    strcpy(a.sun_path, path);
    unlink(path);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(fd, 1024) < 0) die("listen");
    return fd;
}

static void on_signal(int sig) { (void)sig; stopping = 1; }

int main(int argc, char **argv) {
    if (argc == 3 && (strcmp(argv[1], "route") == 0 || strcmp(argv[1], "ipc") == 0)) {
        route_mode = strcmp(argv[1], "route") == 0 ? 1 : 2;
        listen_fd[nlisten++] = listen_unix(argv[2]);
    } else if (argc >= 4 && argc % 2 == 0 && strcmp(argv[1], "backend") == 0 && (argc - 2) / 2 <= MAX_LISTEN) {
        for (int i = 2; i < argc; i += 2) {
            build_answers(nlisten, argv[i + 1]);
            listen_fd[nlisten++] = listen_tcp(atoi(argv[i]));
        }
    } else {
        fprintf(stderr, "usage: %s backend PORT NAME [PORT NAME ...] | route SOCKET_PATH | ipc SOCKET_PATH\n", argv[0]);
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < nlisten; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i};  /* small ints: listeners */
        epoll_ctl(ep, EPOLL_CTL_ADD, listen_fd[i], &ev);
    }
    printf("listening\n");
    fflush(stdout);
    struct epoll_event evs[MAX_EVENTS];
    while (!stopping) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, 500);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 < MAX_LISTEN) {
                int li = (int)evs[i].data.u64, fd;
                while ((fd = accept4(listen_fd[li], NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    int one = 1;
                    if (!route_mode) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *c = calloc(1, sizeof *c);
                    if (!c) die("calloc");
                    c->fd = fd;
                    c->name = li;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            conn_t *c = evs[i].data.ptr;
            int r = 0;
            if (evs[i].events & EPOLLOUT) {
                r = flush(c);
                if (r == 1) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    r = 0;
                }
            } else if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                r = on_readable(ep, c);
            }
            if (r < 0) close_conn(c);
        }
    }
    return 0;
}
