/*
 * sigpoll core poller.  The contract is in sigpoll.h; the reasoning in docs/design.md.
 *
 * Shape of one wait:
 *   1. epoll_wait on the set {device fds, signalfd, eventfd}; EINTR is restarted with the
 *      remaining timeout, so callers never see it.
 *   2. Device fds epoll reported go straight to the caller's buffer.
 *   3. If the signalfd fired, every queued siginfo is drained.  ssi_fd is a hint: if epoll
 *      reported that fd in this batch the hint is "confirmed"; otherwise the fd joins the
 *      hint list.  A plain SIGIO means the RT queue overflowed and hints were lost, so every
 *      registered fd joins the hint list (a full level rescan).
 *   4. Retry step: hinted fds are checked at level with one poll().  Ready ones are
 *      reported ("edge recovered"); the rest stay armed in epoll, whose later edge wakes
 *      the next wait ("hint pending").  Nothing is reported that poll() did not confirm.
 */
#define _GNU_SOURCE
#include "sigpoll.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* epoll data values for the poller's own fds: outside the range of any fd. */
#define TOKEN_SIGNALFD (UINT64_C(1) << 32)
#define TOKEN_EVENTFD ((UINT64_C(1) << 32) + 1)

#define SIGINFO_BATCH 64

typedef struct reg {
    uint8_t used;
    uint8_t hinted;      /* on the hint list */
    uint8_t inherited;   /* registered before a fork(): the parent owns its flags */
    uint32_t events;     /* what the caller asked for (EPOLLIN | EPOLLOUT | ...) */
    uint32_t flags;      /* SP_EDGE | SP_NO_SIGNAL */
    uint64_t stamp;      /* batch number in which this fd was last put in the output */
    int out_index;       /* its slot in that batch */
    /* What register() changed, so unregister() can put it back, and which file that was:
     * if the caller closed the fd and the number now names another file, hands off. */
    dev_t dev;
    ino_t ino;
    int orig_fl;
    int orig_sig;
    struct f_owner_ex orig_owner;
} reg;

struct sp_poller {
    pthread_mutex_t lock;
    int signo;
    int epfd, sigfd, evfd;
    int closed;
    int waiters;
    uint32_t options;    /* SP_RETURN_ON_EINTR */
    int remaining_ms;    /* what an interrupted wait had left */
    uint64_t fork_gen;   /* fork generation the fds belong to */
    pid_t owner_tid;     /* thread the fds' signals are aimed at */
    sigset_t sigs;       /* signals this poller blocks and reads */

    reg *regs;           /* indexed by fd */
    int nregs_cap;
    int nregistered;

    int *hints;          /* fds waiting for the level check */
    int nhints;

    struct epoll_event *evbuf;
    int evcap;
    struct pollfd *pfds; /* scratch for the level check, nregs_cap long */
    uint64_t batch;

    int64_t poll_max_ns; /* busy-poll ceiling (0: off) */
    int64_t poll_ns;     /* current busy-poll budget, adapted after each wait */

    int wakers;          /* sp_poller_wake() calls in flight (they take no lock) */
    sp_poller *prev, *next; /* every poller of the process, for the fork hooks */

    sp_counters c;
};

/* ---- process and thread identity ------------------------------------------------------ */

static uint64_t fork_generation;
static __thread pid_t cached_tid;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static sp_poller *registry; /* every live poller, linked through prev/next */

/*
 * fork() copies a poller's lock in whatever state another thread left it.  So the fork
 * takes every poller's lock first (no call holds one for long: waits drop it around
 * epoll_wait), the parent then lets go, and the child starts with fresh locks, before
 * any thread of its own exists.  The child's epoll set, signalfd and eventfd are still
 * the parent's: each poller notices the new generation on its next call and builds its
 * own, under its lock.
 */
static void on_fork_prepare(void)
{
    pthread_mutex_lock(&registry_lock);
    for (sp_poller *p = registry; p; p = p->next)
        pthread_mutex_lock(&p->lock);
}

static void on_fork_parent(void)
{
    for (sp_poller *p = registry; p; p = p->next)
        pthread_mutex_unlock(&p->lock);
    pthread_mutex_unlock(&registry_lock);
}

static void on_fork_child(void)
{
    for (sp_poller *p = registry; p; p = p->next) {
        pthread_mutex_init(&p->lock, NULL);
        p->waiters = 0; /* the parent's waiting threads do not exist here */
        p->wakers = 0;
    }
    pthread_mutex_init(&registry_lock, NULL);
    __atomic_add_fetch(&fork_generation, 1, __ATOMIC_SEQ_CST);
    cached_tid = 0;
}

static void install_atfork(void) { pthread_atfork(on_fork_prepare, on_fork_parent, on_fork_child); }

static pid_t current_tid(void)
{
    if (!cached_tid)
        cached_tid = (pid_t)syscall(SYS_gettid);
    return cached_tid;
}

/* ---- small helpers ----------------------------------------------------------------------- */

static int grow_regs(sp_poller *p, int fd)
{
    if (fd < p->nregs_cap)
        return 0;
    int cap = p->nregs_cap ? p->nregs_cap : 64;
    while (cap <= fd)
        cap *= 2;
    /* Each array is swapped in as soon as it has grown; the capacity only moves once all
     * three have, so a failure part-way leaves a consistent (old-sized) table. */
    reg *r = realloc(p->regs, (size_t)cap * sizeof(reg));
    if (!r)
        return -ENOMEM;
    memset(r + p->nregs_cap, 0, (size_t)(cap - p->nregs_cap) * sizeof(reg));
    p->regs = r;
    int *h = realloc(p->hints, (size_t)cap * sizeof(int));
    if (!h)
        return -ENOMEM;
    p->hints = h;
    struct pollfd *pf = realloc(p->pfds, (size_t)cap * sizeof(struct pollfd));
    if (!pf)
        return -ENOMEM;
    p->pfds = pf;
    p->nregs_cap = cap;
    return 0;
}

static reg *lookup(sp_poller *p, int fd)
{
    if (fd < 0 || fd >= p->nregs_cap || !p->regs[fd].used)
        return NULL;
    return &p->regs[fd];
}

static uint32_t epoll_mask(uint32_t events, uint32_t flags)
{
    return events | ((flags & SP_EDGE) ? EPOLLET : 0);
}

static int uses_signals(const sp_poller *p, const reg *r)
{
    return !(r->flags & SP_NO_SIGNAL);
}

/* Whether unregistering should put the fd's flags back: not for fds inherited across
 * fork(), whose open file descriptions the parent's poller still relies on. */
static int owns_flags(const sp_poller *p, const reg *r)
{
    return uses_signals(p, r) && !r->inherited;
}

/* Aim the fd's signals at the owner thread. */
static int set_owner(sp_poller *p, int fd)
{
    struct f_owner_ex own = {.type = F_OWNER_TID, .pid = p->owner_tid};
    return fcntl(fd, F_SETOWN_EX, &own) < 0 ? -errno : 0;
}

/* Only files whose drivers implement fasync deliver O_ASYNC signals; F_SETFL accepts the
 * flag silently on the others, so the type is checked up front. */
static int check_async_capable(int fd)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (S_ISCHR(st.st_mode) || S_ISSOCK(st.st_mode) || S_ISFIFO(st.st_mode))
        return 0;
    return -EOPNOTSUPP;
}

static void restore_fd(reg *r, int fd)
{
    /* Best effort: the caller may already have closed the fd, or even reused its number. */
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_dev != r->dev || st.st_ino != r->ino)
        return;
    fcntl(fd, F_SETFL, r->orig_fl);
    fcntl(fd, F_SETSIG, r->orig_sig);
    fcntl(fd, F_SETOWN_EX, &r->orig_owner); /* pid 0 clears the owner again */
}

/* Open the poller's own fds (epoll set, signalfd, eventfd). */
static int open_own_fds(sp_poller *p)
{
    struct epoll_event ev;
    p->epfd = p->sigfd = p->evfd = -1;
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (p->epfd < 0)
        return -errno;
    __atomic_store_n(&p->evfd, eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC), __ATOMIC_SEQ_CST);
    if (p->evfd < 0)
        return -errno;
    ev.events = EPOLLIN;
    ev.data.u64 = TOKEN_EVENTFD;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->evfd, &ev) < 0)
        return -errno;
    p->sigfd = signalfd(-1, &p->sigs, SFD_NONBLOCK | SFD_CLOEXEC);
    if (p->sigfd < 0)
        return -errno;
    ev.events = EPOLLIN;
    ev.data.u64 = TOKEN_SIGNALFD;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->sigfd, &ev) < 0)
        return -errno;
    return 0;
}

static void close_own_fds(sp_poller *p)
{
    if (p->epfd >= 0)
        close(p->epfd);
    if (p->sigfd >= 0)
        close(p->sigfd);
    p->epfd = p->sigfd = -1;
    /* A wake() in flight may have read the eventfd's number already: wait until it is out
     * before the number can name another file (wake() takes no lock, to stay
     * async-signal-safe; it only spends a write() inside). */
    int ev = __atomic_exchange_n(&p->evfd, -1, __ATOMIC_SEQ_CST);
    if (ev >= 0) {
        while (__atomic_load_n(&p->wakers, __ATOMIC_SEQ_CST))
            sched_yield();
        close(ev);
    }
}

/*
 * After fork() the child shares the parent's epoll set (an epoll_ctl in the child would
 * change the parent's), and a signalfd only wakes epoll for the process that made it.  So
 * the child gets fresh fds and re-adds its registrations.  It leaves the fds' flags as
 * they are: those open file descriptions are shared with the parent.
 */
static int check_fork(sp_poller *p)
{
    uint64_t gen = __atomic_load_n(&fork_generation, __ATOMIC_SEQ_CST);
    if (gen == p->fork_gen)
        return 0;
    p->fork_gen = gen;
    close_own_fds(p);
    if (p->closed)
        return -ESHUTDOWN;
    int rc = open_own_fds(p);
    if (rc < 0)
        return rc;
    p->owner_tid = 0; /* re-owned by the next wait in the child */
    p->nhints = 0;
    for (int fd = 0; fd < p->nregs_cap; fd++) {
        reg *r = &p->regs[fd];
        if (!r->used)
            continue;
        r->hinted = 0;
        r->inherited = 1;
        struct epoll_event ev = {.events = epoll_mask(r->events, r->flags), .data.u64 = (uint64_t)fd};
        if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            r->used = 0, p->nregistered--; /* closed since: nothing to watch */
    }
    return 0;
}

/* Enter a call: handles fork and closed state.  Returns with the lock held on success.
 * The rebuild after a fork runs under the lock: another thread of the child waits for it. */
static int enter(sp_poller *p)
{
    pthread_mutex_lock(&p->lock);
    int rc = check_fork(p);
    if (rc == 0 && p->closed)
        rc = -ESHUTDOWN;
    if (rc < 0) {
        pthread_mutex_unlock(&p->lock);
        return rc;
    }
    return 0;
}

/* Enter and find fd's registration: returns with the lock held, or an error without it. */
static int enter_registered(sp_poller *p, int fd, reg **out)
{
    int rc = enter(p);
    if (rc < 0)
        return rc;
    *out = lookup(p, fd);
    if (!*out) {
        pthread_mutex_unlock(&p->lock);
        return -ENOENT;
    }
    return 0;
}

/* ---- lifecycle ----------------------------------------------------------------------------- */

int sp_poller_new(int signo, int max_events, sp_poller **out)
{
    *out = NULL;
    if (signo < SIGRTMIN || signo > SIGRTMAX)
        return -EINVAL;
    if (max_events < 1 || max_events > 65536)
        return -EINVAL;
    pthread_once(&atfork_once, install_atfork);

    sp_poller *p = calloc(1, sizeof(*p));
    if (!p)
        return -ENOMEM;
    pthread_mutex_init(&p->lock, NULL);
    p->signo = signo;
    p->fork_gen = __atomic_load_n(&fork_generation, __ATOMIC_SEQ_CST);
    p->owner_tid = current_tid();
    sigemptyset(&p->sigs);
    sigaddset(&p->sigs, p->signo);
    sigaddset(&p->sigs, SIGIO);
    /* Block in the creating thread before any fd can send to it: an unblocked RT signal
     * with no handler kills the process.  Threads started later inherit the mask. */
    pthread_sigmask(SIG_BLOCK, &p->sigs, NULL);

    p->evcap = max_events;
    p->evbuf = calloc((size_t)max_events, sizeof(struct epoll_event));
    pthread_mutex_lock(&registry_lock);
    p->next = registry;
    if (registry)
        registry->prev = p;
    registry = p;
    pthread_mutex_unlock(&registry_lock);
    int rc = p->evbuf ? open_own_fds(p) : -ENOMEM;
    if (rc < 0) {
        sp_poller_free(p);
        return rc;
    }
    *out = p;
    return 0;
}

static void teardown(sp_poller *p)
{
    for (int fd = 0; fd < p->nregs_cap; fd++) {
        reg *r = &p->regs[fd];
        if (!r->used)
            continue;
        if (owns_flags(p, r))
            restore_fd(r, fd);
        r->used = 0;
    }
    p->nregistered = 0;
    p->nhints = 0;
    if (p->sigfd >= 0) {
        /* Leftover hints would only count against RLIMIT_SIGPENDING. */
        struct signalfd_siginfo si[SIGINFO_BATCH];
        while (read(p->sigfd, si, sizeof(si)) > 0)
            ;
    }
    close_own_fds(p);
}

int sp_poller_close(sp_poller *p)
{
    pthread_mutex_lock(&p->lock);
    uint64_t gen = __atomic_load_n(&fork_generation, __ATOMIC_SEQ_CST);
    if (gen != p->fork_gen) {
        /* Closing in a forked child: drop the child's copies only, never touch the flags
         * of file descriptions the parent is still using. */
        close_own_fds(p);
        for (int fd = 0; fd < p->nregs_cap; fd++)
            p->regs[fd].used = 0;
        p->nregistered = 0;
        p->closed = 1;
        p->fork_gen = gen;
        pthread_mutex_unlock(&p->lock);
        return 0;
    }
    if (p->closed) {
        pthread_mutex_unlock(&p->lock);
        return 0;
    }
    p->closed = 1;
    if (p->waiters > 0) {
        /* A waiter is inside epoll_wait on these fds: wake it; the last one out tears down. */
        uint64_t one = 1;
        if (write(p->evfd, &one, sizeof(one)) < 0) { /* counter saturated: already awake */ }
    } else {
        teardown(p);
    }
    pthread_mutex_unlock(&p->lock);
    return 0;
}

void sp_poller_free(sp_poller *p)
{
    if (!p)
        return;
    if (!p->closed)
        sp_poller_close(p);
    pthread_mutex_lock(&registry_lock);
    if (p->prev)
        p->prev->next = p->next;
    else
        registry = p->next;
    if (p->next)
        p->next->prev = p->prev;
    pthread_mutex_unlock(&registry_lock);
    if (p->epfd >= 0 || p->sigfd >= 0 || p->evfd >= 0)
        close_own_fds(p);
    free(p->regs);
    free(p->hints);
    free(p->pfds);
    free(p->evbuf);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

int sp_poller_fileno(sp_poller *p)
{
    int rc = enter(p);
    if (rc < 0)
        return rc;
    rc = p->epfd;
    pthread_mutex_unlock(&p->lock);
    return rc;
}

/* ---- registration -------------------------------------------------------------------------- */

int sp_poller_register(sp_poller *p, int fd, uint32_t events, uint32_t flags)
{
    if (fd < 0)
        return -EBADF;
    if (flags & ~(SP_EDGE | SP_NO_SIGNAL))
        return -EINVAL;
    int rc = enter(p);
    if (rc < 0)
        return rc;
    if (lookup(p, fd)) {
        rc = -EEXIST;
        goto out;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) {
        rc = -errno;
        goto out;
    }
    int wants_sig = !(flags & SP_NO_SIGNAL);
    if (wants_sig && (rc = check_async_capable(fd)) < 0)
        goto out;
    if ((rc = grow_regs(p, fd)) < 0)
        goto out;

    struct stat st;
    if (fstat(fd, &st) < 0) {
        rc = -errno;
        goto out;
    }
    reg r = {.used = 1, .events = events, .flags = flags, .orig_fl = fl, .dev = st.st_dev, .ino = st.st_ino};
    struct epoll_event ev = {.events = epoll_mask(events, flags), .data.u64 = (uint64_t)fd};
    /* epoll first: it rejects regular files and directories (EPERM) before anything changed. */
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        rc = -errno;
        goto out;
    }
    if (wants_sig) {
        /* Signal number and owner before O_ASYNC, so no signal goes to the wrong place. */
        r.orig_sig = fcntl(fd, F_GETSIG);
        if (fcntl(fd, F_GETOWN_EX, &r.orig_owner) < 0 || r.orig_sig < 0 ||
            fcntl(fd, F_SETSIG, p->signo) < 0 || (rc = set_owner(p, fd)) < 0 ||
            fcntl(fd, F_SETFL, fl | O_ASYNC | O_NONBLOCK) < 0) {
            if (rc == 0)
                rc = -errno;
            epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, NULL);
            if (r.orig_sig >= 0)
                restore_fd(&r, fd);
            goto out;
        }
    }
    p->regs[fd] = r;
    p->nregistered++;
    /* The edge may have fired before O_ASYNC was on: epoll's ADD already checked readiness,
     * so nothing is lost here. */
out:
    pthread_mutex_unlock(&p->lock);
    return rc;
}

int sp_poller_modify(sp_poller *p, int fd, uint32_t events, uint32_t flags)
{
    reg *r;
    int rc = enter_registered(p, fd, &r);
    if (rc < 0)
        return rc;
    /* The signal setting is fixed at registration; only events and edge change. */
    flags = (flags & SP_EDGE) | (r->flags & SP_NO_SIGNAL);
    struct epoll_event ev = {.events = epoll_mask(events, flags), .data.u64 = (uint64_t)fd};
    if (epoll_ctl(p->epfd, EPOLL_CTL_MOD, fd, &ev) < 0) {
        rc = -errno;
        goto out;
    }
    r->events = events;
    r->flags = flags;
out:
    pthread_mutex_unlock(&p->lock);
    return rc;
}

int sp_poller_unregister(sp_poller *p, int fd)
{
    reg *r;
    int rc = enter_registered(p, fd, &r);
    if (rc < 0)
        return rc;
    /* EBADF here means the caller closed the fd first: epoll already forgot it. */
    epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, NULL);
    if (owns_flags(p, r))
        restore_fd(r, fd);
    if (r->hinted) {
        /* Off the hint list, so a re-registration of the same number cannot be listed twice. */
        for (int i = 0; i < p->nhints; i++)
            if (p->hints[i] == fd) {
                p->hints[i] = p->hints[--p->nhints];
                break;
            }
    }
    r->used = 0;
    p->nregistered--;
    pthread_mutex_unlock(&p->lock);
    return rc;
}

int sp_poller_lookup(sp_poller *p, int fd, uint32_t *events, uint32_t *flags)
{
    if (enter(p) < 0)
        return 0;
    reg *r = lookup(p, fd);
    if (r) {
        if (events)
            *events = r->events;
        if (flags)
            *flags = r->flags;
    }
    pthread_mutex_unlock(&p->lock);
    return r != NULL;
}

/* ---- waiting ------------------------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#define POLL_START_NS 4000

/* Look at the epoll set without sleeping until something is there or budget_ns has gone.
 * Returns what epoll_wait returned last (0: nothing, so the caller sleeps). */
static int busy_poll(int epfd, struct epoll_event *buf, int cap, int64_t start, int64_t budget_ns)
{
    int got;
    do {
        got = epoll_wait(epfd, buf, cap, 0);
    } while (got == 0 && now_ns() - start < budget_ns);
    return got;
}

/* After a wait that began at start (QEMU's AioContext adapts its polling the same way):
 * an event inside the budget keeps it; a gap longer than the ceiling stops polling; a gap
 * in between grows the budget towards it. */
static void adapt_poll(sp_poller *p, int64_t start)
{
    int64_t took = now_ns() - start;
    if (took <= p->poll_ns)
        return;
    if (took > p->poll_max_ns) {
        p->poll_ns = 0;
        return;
    }
    int64_t grown = p->poll_ns ? p->poll_ns * 2 : POLL_START_NS;
    p->poll_ns = grown < p->poll_max_ns ? grown : p->poll_max_ns;
}

static void add_hint(sp_poller *p, int fd)
{
    reg *r = lookup(p, fd);
    if (!r || r->hinted)
        return;
    r->hinted = 1;
    p->hints[p->nhints++] = fd;
}

/* Put an fd in the output, merging with an earlier entry of the same batch. */
static int emit(sp_poller *p, sp_event *out, int n, int fd, uint32_t events)
{
    reg *r = &p->regs[fd];
    if (r->stamp == p->batch) {
        out[r->out_index].events |= events;
        return n;
    }
    r->stamp = p->batch;
    r->out_index = n;
    out[n].fd = fd;
    out[n].events = events;
    return n + 1;
}

/* Drain the signalfd; returns 1 if the RT queue overflowed (a plain SIGIO arrived). */
static int drain_signals(sp_poller *p)
{
    struct signalfd_siginfo si[SIGINFO_BATCH];
    int overflow = 0;
    for (;;) {
        ssize_t got = read(p->sigfd, si, sizeof(si));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        int k = (int)(got / (ssize_t)sizeof(si[0]));
        p->c.signals += (uint64_t)k;
        for (int i = 0; i < k; i++) {
            if ((int)si[i].ssi_signo != p->signo) {
                overflow = 1; /* SIGIO: the kernel's fallback when the RT queue is full */
                continue;
            }
            /* Only fasync records (si_code POLL_IN..POLL_HUP) name an fd; an RT signal
             * someone sent with kill() or sigqueue() carries no hint. */
            if (si[i].ssi_code < POLL_IN || si[i].ssi_code > POLL_HUP)
                continue;
            int fd = (int)si[i].ssi_fd;
            reg *r = lookup(p, fd);
            if (!r)
                continue; /* stale: unregistered since */
            if (r->stamp == p->batch)
                p->c.hints_confirmed++;
            else
                add_hint(p, fd);
        }
    }
    return overflow;
}

/* The retry step: level-check hinted fds; report the ready ones, leave the rest armed. */
static int confirm_hints(sp_poller *p, sp_event *out, int n, int max)
{
    int npfd = 0;
    for (int i = 0; i < p->nhints; i++) {
        reg *r = lookup(p, p->hints[i]);
        if (!r)
            continue;
        p->pfds[npfd].fd = p->hints[i];
        p->pfds[npfd].events = (short)(r->events & (EPOLLIN | EPOLLOUT | EPOLLPRI | EPOLLRDHUP));
        p->pfds[npfd].revents = 0;
        npfd++;
    }
    if (npfd && poll(p->pfds, (nfds_t)npfd, 0) < 0)
        return n; /* EINTR/ENOMEM: keep the hints for the next wait */

    int kept = 0;
    for (int i = 0; i < npfd; i++) {
        int fd = p->pfds[i].fd;
        reg *r = &p->regs[fd];
        short rev = p->pfds[i].revents;
        if (rev & POLLNVAL) {
            r->hinted = 0; /* closed under us: nothing to report */
            continue;
        }
        if (!rev) {
            p->c.hints_pending++;
            r->hinted = 0;
            continue;
        }
        if (r->stamp == p->batch) {
            /* epoll reported it meanwhile: already in the output. */
            r->hinted = 0;
            continue;
        }
        if (n >= max) {
            p->hints[kept++] = fd; /* no room: carried to the next wait */
            continue;
        }
        r->hinted = 0;
        p->c.edges_recovered++;
        n = emit(p, out, n, fd, (uint32_t)rev);
    }
    p->nhints = kept;
    return n;
}

static void drain_eventfd(sp_poller *p, uint32_t *woken)
{
    uint64_t v;
    if (read(p->evfd, &v, sizeof(v)) == sizeof(v) && woken)
        *woken |= SP_WOKEN;
}

static int leave_wait(sp_poller *p, int rc)
{
    p->waiters--;
    if (p->closed) {
        if (p->waiters == 0)
            teardown(p);
        rc = -ESHUTDOWN;
    }
    pthread_mutex_unlock(&p->lock);
    return rc;
}

/* Point every signal-driven fd at the calling thread and block the signals there. */
static void adopt_thread(sp_poller *p)
{
    pid_t tid = current_tid();
    if (p->owner_tid == tid)
        return;
    pthread_sigmask(SIG_BLOCK, &p->sigs, NULL);
    p->owner_tid = tid;
    for (int fd = 0; fd < p->nregs_cap; fd++)
        if (p->regs[fd].used && uses_signals(p, &p->regs[fd]))
            set_owner(p, fd);
    /* Hints queued to the previous thread stay there; a rescan stands in for them. */
    if (p->nregistered)
        p->c.rescans++;
    for (int fd = 0; fd < p->nregs_cap; fd++)
        if (p->regs[fd].used)
            add_hint(p, fd);
}

static int wait_sigpoll(sp_poller *p, int timeout_ms, sp_event *out, int max, uint32_t *woken)
{
    int64_t deadline = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
    int epfd = p->epfd;
    if (p->nhints)
        timeout_ms = 0; /* carried-over hints are answered now */
    /* A zero timeout asks for a look, not a wait: it neither polls nor says anything
     * about how long events take to come. */
    int adapt = p->poll_max_ns > 0 && timeout_ms != 0;
    int64_t budget = p->poll_ns;
    if (timeout_ms > 0 && budget > (int64_t)timeout_ms * 1000000)
        budget = (int64_t)timeout_ms * 1000000;
    pthread_mutex_unlock(&p->lock);

    int cap = max < p->evcap ? max : p->evcap;
    int64_t start = adapt ? now_ns() : 0;
    int got = 0, polled = 0;
    if (adapt && budget > 0) {
        got = busy_poll(epfd, p->evbuf, cap, start, budget);
        polled = got > 0;
    }
    for (;;) {
        if (got == 0 && !polled) {
            if (timeout_ms > 0) {
                int64_t left = deadline - now_ms();
                timeout_ms = left > 0 ? (int)left : 0;
            }
            got = epoll_wait(epfd, p->evbuf, cap, timeout_ms);
        }
        if (got >= 0 || errno != EINTR)
            break;
        got = 0;
        if (p->options & SP_RETURN_ON_EINTR) {
            *woken |= SP_INTERRUPTED;
            break;
        }
        /* Interrupted: restart with what is left (above), never surface EINTR. */
    }
    int err = got < 0 ? -errno : 0;

    pthread_mutex_lock(&p->lock);
    p->c.wakeups++;
    if (polled)
        p->c.polled++;
    if (adapt && p->poll_max_ns > 0)
        adapt_poll(p, start);
    if (p->closed || err)
        return err;
    p->batch++;
    int n = 0, sig = 0;
    for (int i = 0; i < got; i++) {
        uint64_t tok = p->evbuf[i].data.u64;
        if (tok == TOKEN_SIGNALFD)
            sig = 1;
        else if (tok == TOKEN_EVENTFD)
            drain_eventfd(p, woken);
        else if (lookup(p, (int)tok))
            n = emit(p, out, n, (int)tok, p->evbuf[i].events);
        /* else: unregistered by another thread while we slept */
    }
    if (sig && drain_signals(p)) {
        p->c.overflows++;
        p->c.rescans++;
        for (int fd = 0; fd < p->nregs_cap; fd++)
            if (p->regs[fd].used)
                add_hint(p, fd);
    }
    if (p->nhints)
        n = confirm_hints(p, out, n, max);
    return n;
}

int sp_poller_wait(sp_poller *p, int timeout_ms, sp_event *out, int max, uint32_t *woken)
{
    uint32_t why = 0;
    if (woken)
        *woken = 0;
    if (max < 1)
        return -EINVAL;
    int rc = enter(p);
    if (rc < 0)
        return rc;
    if (p->waiters) {
        /* One event buffer, one waiter: a second thread must use its own poller. */
        pthread_mutex_unlock(&p->lock);
        return -EBUSY;
    }
    adopt_thread(p);
    p->waiters++;
    int64_t deadline = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
    for (;;) {
        rc = wait_sigpoll(p, timeout_ms, out, max, &why);
        /* Nothing to report yet (a hint that was not ready, a signal with no epoll event)
         * is not a timeout: sleep again for what is left, so an empty return always means
         * the time ran out or wake() was called. */
        if (rc != 0 || why || p->closed || timeout_ms == 0)
            break;
        if (timeout_ms > 0) {
            int64_t left = deadline - now_ms();
            if (left <= 0)
                break;
            timeout_ms = (int)left;
        }
    }
    if (why & SP_INTERRUPTED) {
        int64_t left = timeout_ms > 0 ? deadline - now_ms() : timeout_ms;
        p->remaining_ms = left > 0 ? (int)left : (timeout_ms < 0 ? -1 : 0);
    }
    if (woken)
        *woken = why;
    return leave_wait(p, rc);
}

int sp_poller_wake(sp_poller *p)
{
    /* No lock: must be callable from a signal handler.  Counting ourselves in first makes
     * close_own_fds() wait before it closes the number we are about to write to. */
    __atomic_add_fetch(&p->wakers, 1, __ATOMIC_SEQ_CST);
    uint64_t one = 1;
    int rc = 0;
    int fd = __atomic_load_n(&p->evfd, __ATOMIC_SEQ_CST);
    if (fd < 0)
        rc = -ESHUTDOWN;
    else if (write(fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        rc = -errno;
    __atomic_sub_fetch(&p->wakers, 1, __ATOMIC_SEQ_CST);
    return rc;
}

/* ---- introspection ------------------------------------------------------------------------ */

void sp_poller_counters(sp_poller *p, sp_counters *out)
{
    pthread_mutex_lock(&p->lock);
    *out = p->c;
    pthread_mutex_unlock(&p->lock);
}

int sp_poller_signal(sp_poller *p) { return p->signo; }

int sp_poller_remaining_ms(sp_poller *p) { return p->remaining_ms; }

void sp_poller_set_options(sp_poller *p, uint32_t options)
{
    pthread_mutex_lock(&p->lock);
    p->options = options;
    pthread_mutex_unlock(&p->lock);
}

void sp_poller_set_busy_poll(sp_poller *p, int64_t max_ns)
{
    if (max_ns < 0)
        max_ns = 0;
    if (max_ns > 1000000000)
        max_ns = 1000000000;
    pthread_mutex_lock(&p->lock);
    p->poll_max_ns = max_ns;
    p->poll_ns = 0;
    pthread_mutex_unlock(&p->lock);
}

int64_t sp_poller_busy_poll(sp_poller *p)
{
    pthread_mutex_lock(&p->lock);
    int64_t v = p->poll_max_ns;
    pthread_mutex_unlock(&p->lock);
    return v;
}

int sp_poller_owner_tid(sp_poller *p) { return p->owner_tid; }

int sp_poller_count(sp_poller *p) { return p->nregistered; }
