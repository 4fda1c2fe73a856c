/* uload: minimal HTTP/1.1 keep-alive load client for a Unix domain socket.
 *
 * One thread, epoll, C connections, no pipelining; each connection cycles through
 * pre-built raw requests.  Per request: one write(), usually one read().
 * Built and driven by bench/harness.py; not meant to be used by hand.
 * Copied unchanged from the project's reference benchmark harness (see bench/README.md).
 *
 *   uload SOCK CONNS DURATION_S WARMUP_S NREQ REQFILE OUTFILE
 *   uload SOCK1,SOCK2[,..] CONNS DURATION_S WARMUP_S 0 REQFILE OUTFILE [SLOT_MS]
 *
 * Sliced mode (several sockets, CONNS each): only one server is loaded at a time,
 * in slots of SLOT_MS (default 50, stretched to >= 10 mean latencies of the slowest
 * server) in the order A B B A A B ...; at the end of a slot no new requests are
 * sent and the slot closes when its last response is in.
 * A server's throughput = requests sent in its measured slots / the summed time
 * from each slot's start to its last response (the server is busy all that time),
 * so machine drift hits every server alike.  Slots starting in the first WARMUP_S
 * are not measured; it runs until each server has DURATION_S of measured busy time
 * and the last A..Z Z..A cycle is complete.
 * Records then carry the server index instead of the request index.
 *
 * REQFILE: repeated [u32 little-endian length][raw request bytes].
 * OUTFILE: repeated records {u32 latency_us, u16 status, u16 req_index} for the
 *          requests sent inside the measured window (or all of them with NREQ>0).
 * stdout:  "sent=N recorded=N rx=N tx=N main_wall_s=F conn_err=N timeouts=N closed=N"
 * Build:   gcc -O2 -o uload uload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

typedef struct { char *p; uint32_t n; } req_t;
typedef struct {
    int fd, busy, dead, srv;
    uint32_t ri;            /* next request index */
    uint32_t cur;           /* index of in-flight request */
    double t0;              /* send time */
    int rec;                /* record this one */
    char *buf; size_t len, cap;
    size_t woff;            /* partial write offset */
} conn_t;
#pragma pack(push, 1)
typedef struct { uint32_t us; uint16_t status; uint16_t ri; } rec_t;
#pragma pack(pop)

static req_t *reqs; static uint32_t nreqs;
static double t_main, t_end;
static long long nreq_limit, sent, recorded, rx, tx, conn_err, timeouts, closed_;
static FILE *out;
static int epfd, live;
/* sliced mode (several sockets): one server active at a time, ABBA slots */
static int nsrv = 1, active, draining, sliced;
static long long inflight[16], sent_all[16], slot_sent, sl_sent[16], sl_rx[16], sl_tx[16], sl_slots[16];
static double sl_busy[16], slot_t0, slot_end, slot_len; static int slot_meas, slot_k;
static double t_warm_end, ewma_lat[16], slot_cur;

static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int may_send(double t) {
    if (t >= t_end) return 0;
    if (nreq_limit && sent >= nreq_limit) return 0;
    return 1;
}

static void conn_close(conn_t *c) {
    if (c->dead) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    if (sliced && c->busy) inflight[c->srv]--;
    close(c->fd); c->dead = 1; c->busy = 0; live--;
}

static void do_write(conn_t *c) {
    req_t *r = &reqs[c->cur];
    while (c->woff < r->n) {
        ssize_t w = write(c->fd, r->p + c->woff, r->n - c->woff);
        if (w < 0) {
            if (errno == EAGAIN) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
                return;
            }
            closed_++; conn_close(c); return;
        }
        c->woff += w;
    }
}

static void send_next(conn_t *c) {
    double t = now();
    if (sliced) {
        if (c->srv != active || draining || t >= slot_end) { c->busy = 0; return; } /* park */
        c->cur = c->ri % nreqs; c->ri++;
        c->t0 = t; c->rec = slot_meas; c->busy = 1; c->woff = 0;
        inflight[c->srv]++; slot_sent++; sent++; sent_all[c->srv]++;
        if (c->rec) { sl_tx[c->srv] += reqs[c->cur].n; }
        do_write(c);
        return;
    }
    if (!may_send(t)) { conn_close(c); return; }
    c->cur = c->ri % nreqs; c->ri++;
    c->t0 = t; c->rec = (nreq_limit > 0) || (t >= t_main); c->busy = 1; c->woff = 0;
    sent++;
    if (c->rec) tx += reqs[c->cur].n;
    do_write(c);
}

/* returns response length if complete, 0 if incomplete, -1 on parse error */
static long resp_complete(conn_t *c, int *status) {
    char *b = c->buf; size_t n = c->len;
    char *h = memmem(b, n, "\r\n\r\n", 4);
    if (!h) return 0;
    size_t hl = h - b + 4;
    if (n < 12) return -1;
    *status = atoi(b + 9);
    /* scan header lines */
    char *p = memchr(b, '\n', hl) + 1;
    long clen = -1; int chunked = 0;
    while (p < b + hl - 2) {
        char *e = memchr(p, '\n', b + hl - p);
        if (!e) break;
        if (e - p > 15 && strncasecmp(p, "content-length:", 15) == 0) clen = strtol(p + 15, NULL, 10);
        else if (e - p > 18 && strncasecmp(p, "transfer-encoding:", 18) == 0 && memmem(p, e - p, "chunked", 7)) chunked = 1;
        p = e + 1;
    }
    if (clen >= 0) return (n >= hl + (size_t)clen) ? (long)(hl + clen) : 0;
    if (chunked) {
        size_t pos = hl;
        for (;;) {
            char *e = memmem(b + pos, n - pos, "\r\n", 2);
            if (!e) return 0;
            long sz = strtol(b + pos, NULL, 16);
            pos = (e - b) + 2 + sz + 2;
            if (pos > n) return 0;
            if (sz == 0) return (long)pos;
        }
    }
    return (long)hl; /* no body */
}

static void on_read(conn_t *c) {
    {
        if (c->cap - c->len < 16384) {
            c->cap = c->cap * 2 + 65536; c->buf = realloc(c->buf, c->cap);
        }
        ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
        if (r < 0) { if (errno == EAGAIN) return; closed_++; conn_close(c); return; }
        if (r == 0) { if (c->busy) closed_++; conn_close(c); return; }
        c->len += r;
        int status = 0;
        long done = resp_complete(c, &status);
        if (done < 0) { closed_++; conn_close(c); return; }
        if (done == 0) return; /* level-triggered: epoll reports again if more is pending */
        double t = now();
        if (sliced) {
            inflight[c->srv]--;
            ewma_lat[c->srv] = ewma_lat[c->srv] * 0.98 + (t - c->t0) * 0.02;
        }
        if (c->rec) {
            rec_t rec = {(uint32_t)((t - c->t0) * 1e6 + 0.5), (uint16_t)status,
                         (uint16_t)(sliced ? (uint32_t)c->srv : c->cur)};
            fwrite(&rec, sizeof rec, 1, out);
            recorded++; rx += done;
            if (sliced) sl_rx[c->srv] += done;
        }
        int close_after = memmem(c->buf, done < 4096 ? done : 4096, "onnection: close", 16) != NULL;
        memmove(c->buf, c->buf + done, c->len - done); c->len -= done;
        c->busy = 0;
        if (close_after) { conn_close(c); return; }
        send_next(c);
        return;
    }
}

/* pattern 0,1,..,S-1,S-1,..,0 repeated */
static int slot_server(int k) {
    int m = k % (2 * nsrv);
    return m < nsrv ? m : 2 * nsrv - 1 - m;
}

static void start_slot(conn_t *cs, int conns_total) {
    active = slot_server(slot_k);
    draining = 0;
    slot_t0 = now();
    /* adaptive: a slot lasts at least 10 mean latencies of the slowest server so the
       ramp-up/drain at its edges stays a small part of it */
    slot_cur = slot_len;
    for (int s = 0; s < nsrv; s++) if (10 * ewma_lat[s] > slot_cur) slot_cur = 10 * ewma_lat[s];
    slot_end = slot_t0 + slot_cur;
    slot_meas = slot_t0 >= t_warm_end;
    slot_sent = 0;
    for (int i = 0; i < conns_total; i++)
        if (!cs[i].dead && cs[i].srv == active && !cs[i].busy) send_next(&cs[i]);
}

static void end_slot(void) {
    double t = now();
    if (slot_meas) {
        sl_busy[active] += t - slot_t0;
        sl_sent[active] += slot_sent;
        sl_slots[active]++;
    }
    slot_k++;
}

static int run_sliced(conn_t *cs, int conns_total, double dur) {
    struct epoll_event evs[256];
    start_slot(cs, conns_total);
    for (;;) {
        double t = now();
        if (!draining && t >= slot_end) draining = 1;
        if (draining && inflight[active] <= 0) {
            end_slot();
            int done = (slot_k % (2 * nsrv)) == 0;   /* only after a full A..Z Z..A cycle */
            for (int s = 0; s < nsrv; s++) if (sl_busy[s] < dur) done = 0;
            if (done) break;
            start_slot(cs, conns_total);
            continue;
        }
        if (draining && t > slot_end + 30) { timeouts += inflight[active]; break; }
        int ms = draining ? 50 : (int)((slot_end - t) * 1000) + 1;
        int n = epoll_wait(epfd, evs, 256, ms);
        for (int k = 0; k < n; k++) {
            conn_t *c = evs[k].data.ptr;
            if (c->dead) continue;
            if (evs[k].events & EPOLLOUT) {
                do_write(c);
                if (!c->dead && c->woff >= reqs[c->cur].n) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
                }
            }
            if (!c->dead && (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_read(c);
        }
    }
    for (int i = 0; i < conns_total; i++) conn_close(&cs[i]);
    fflush(out); fclose(out);
    for (int s = 0; s < nsrv; s++)
        printf("srv=%d sent=%lld busy_s=%.6f rx=%lld tx=%lld slots=%lld sent_all=%lld\n", s,
               sl_sent[s], sl_busy[s], sl_rx[s], sl_tx[s], sl_slots[s], sent_all[s]);
    printf("total sent=%lld recorded=%lld conn_err=%lld timeouts=%lld closed=%lld\n",
           sent, recorded, conn_err, timeouts, closed_);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 8 && argc != 9) {
        fprintf(stderr, "usage: uload SOCK[,SOCK2..] CONNS DUR WARM NREQ REQFILE OUTFILE [SLOT_MS]\n");
        return 2;
    }
    char *socks[16]; char *sp = strdup(argv[1]);
    for (char *tok = strtok(sp, ","); tok && sliced < 16; tok = strtok(NULL, ",")) socks[sliced++] = tok;
    nsrv = sliced; sliced = nsrv > 1;
    slot_len = (argc == 9 ? atof(argv[8]) : 50.0) / 1000.0;
    int conns = atoi(argv[2]);
    double dur = atof(argv[3]), warm = atof(argv[4]); nreq_limit = atoll(argv[5]);
    FILE *rf = fopen(argv[6], "rb"); if (!rf) { perror("reqfile"); return 2; }
    uint32_t cap = 16; reqs = malloc(cap * sizeof *reqs);
    for (;;) {
        uint32_t n; if (fread(&n, 4, 1, rf) != 1) break;
        if (nreqs == cap) { cap *= 2; reqs = realloc(reqs, cap * sizeof *reqs); }
        reqs[nreqs].p = malloc(n); reqs[nreqs].n = n;
        if (fread(reqs[nreqs].p, 1, n, rf) != n) { fprintf(stderr, "short reqfile\n"); return 2; }
        nreqs++;
    }
    fclose(rf);
    if (!nreqs) { fprintf(stderr, "no requests\n"); return 2; }
    out = fopen(argv[7], "wb"); if (!out) { perror("outfile"); return 2; }
    setvbuf(out, NULL, _IOFBF, 1 << 20);
    epfd = epoll_create1(0);
    int per_srv = conns;
    conns = per_srv * nsrv;
    conn_t *cs = calloc(conns, sizeof *cs);
    double t_start = now();
    t_main = nreq_limit ? t_start : t_start + warm;
    t_end = nreq_limit ? 1e300 : t_main + dur;
    for (int i = 0; i < conns; i++) {
        conn_t *c = &cs[i];
        c->srv = i / per_srv;
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        strncpy(sa.sun_path, socks[c->srv], sizeof sa.sun_path - 1);
        c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            conn_err++; if (c->fd >= 0) close(c->fd); c->dead = 1; continue;
        }
        fcntl(c->fd, F_SETFL, O_NONBLOCK);
        c->ri = (uint32_t)((uint64_t)(i % per_srv) * 7919u % nreqs);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
        live++;
    }
    if (sliced) {
        t_warm_end = now() + warm;
        return run_sliced(cs, conns, dur);
    }
    if (nreq_limit) t_main = now();
    for (int i = 0; i < conns; i++) if (!cs[i].dead) send_next(&cs[i]);
    struct epoll_event evs[256];
    for (;;) {
        if (live <= 0) break;
        double t = now();
        if (t > t_end + 30) {
            for (int i = 0; i < conns; i++) if (!cs[i].dead) { if (cs[i].busy) timeouts++; conn_close(&cs[i]); }
            break;
        }
        int n = epoll_wait(epfd, evs, 256, 200);
        for (int k = 0; k < n; k++) {
            conn_t *c = evs[k].data.ptr;
            if (c->dead) continue;
            if (evs[k].events & EPOLLOUT) {
                do_write(c);
                if (!c->dead && c->woff >= reqs[c->cur].n) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
                }
            }
            if (!c->dead && (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_read(c);
        }
        /* idle connections past the deadline were closed in send_next */
    }
    double main_wall = (nreq_limit ? now() : t_end) - t_main;
    fflush(out); fclose(out);
    printf("sent=%lld recorded=%lld rx=%lld tx=%lld main_wall_s=%.6f conn_err=%lld timeouts=%lld closed=%lld\n",
           sent, recorded, rx, tx, main_wall, conn_err, timeouts, closed_);
    return 0;
}
