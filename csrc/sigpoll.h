/*
 * sigpoll core: one epoll set fed by O_ASYNC real-time signals, with a retry step.
 *
 * A poller owns an epoll set holding
 *   - the device fds the caller registers,
 *   - a signalfd for the poller's real-time signal and for SIGIO (RT-queue overflow),
 *   - an eventfd so another thread can interrupt sp_poller_wait().
 *
 * Signals are hints, never the readiness state: on a tty the kernel sends SIGIO before
 * the epoll callback runs (and sometimes before there is room at all), so the poller
 * always sleeps in epoll_wait and confirms any hinted fd epoll has not reported with a
 * level-triggered poll().  See docs/design.md for the ordering and why each step exists.
 *
 * All functions return 0 (or a count) on success and a negative errno on failure;
 * none of them ever returns -EINTR.  -ESHUTDOWN means the poller has been closed.
 */
#ifndef SIGPOLL_H
#define SIGPOLL_H

#include <stddef.h>
#include <stdint.h>

typedef struct sp_poller sp_poller;

/* One readiness report: the fd and its epoll event bits (EPOLLIN, EPOLLOUT, ...). */
typedef struct sp_event {
    int32_t fd;
    uint32_t events;
} sp_event;

typedef struct sp_counters {
    uint64_t wakeups;         /* returns from epoll_wait / sigtimedwait */
    uint64_t signals;         /* siginfo records read (RT hints and SIGIO) */
    uint64_t hints_confirmed; /* hint for an fd epoll reported in the same wake-up */
    uint64_t hints_pending;   /* hint for an fd that was not ready yet: left armed in epoll */
    uint64_t edges_recovered; /* hint for an fd epoll had not reported, found ready at level */
    uint64_t overflows;       /* plain SIGIO seen: the RT signal queue overflowed */
    uint64_t rescans;         /* full level rescans of every registered fd */
    uint64_t polled;          /* waits answered while busy-polling, without sleeping */
} sp_counters;

/* Registration flags. */
#define SP_EDGE 1u       /* edge-triggered in epoll (EPOLLET) */
#define SP_NO_SIGNAL 2u  /* epoll only: leave O_ASYNC off (sockets gain nothing from it) */

/* Wake-up reasons returned through sp_poller_wait's last argument (may be NULL). */
#define SP_WOKEN 1u       /* sp_poller_wake() was called */
#define SP_INTERRUPTED 2u /* a signal handler must run first (only with SP_RETURN_ON_EINTR) */

/* Poller options for sp_poller_set_options. */
#define SP_RETURN_ON_EINTR 1u /* return 0 with SP_INTERRUPTED instead of restarting at once:
                                 for runtimes (like CPython) whose signal handlers run only
                                 when control comes back to them; they restart the wait */

/*
 * Create a poller.  signo is the real-time signal for O_ASYNC hints (SIGRTMIN..SIGRTMAX).
 * max_events sizes the preallocated event buffer.
 * The calling thread becomes the owner: signals are aimed at it until another thread waits.
 */
int sp_poller_new(int signo, int max_events, sp_poller **out);

/* Release everything; the poller must not be in use by another thread.  NULL is ignored. */
void sp_poller_free(sp_poller *p);

/* Close: wakes a waiter (which then gets -ESHUTDOWN), unregisters every fd restoring its
 * flags, signal and owner, and closes the poller's own fds.  Idempotent. */
int sp_poller_close(sp_poller *p);

/* The epoll fd: pollable, so a poller can be nested in another event loop. -ESHUTDOWN if closed. */
int sp_poller_fileno(sp_poller *p);

int sp_poller_register(sp_poller *p, int fd, uint32_t events, uint32_t flags);
int sp_poller_modify(sp_poller *p, int fd, uint32_t events, uint32_t flags);
/* Restores the fd's original file status flags, F_SETSIG signal and owner. */
int sp_poller_unregister(sp_poller *p, int fd);
/* 1 if registered, 0 if not; events/flags are filled when non-NULL. */
int sp_poller_lookup(sp_poller *p, int fd, uint32_t *events, uint32_t *flags);

/*
 * Wait up to timeout_ms (-1: forever, 0: poll) and fill out[0..max) with ready fds.
 * Returns the count (0 on timeout or a bare wake-up).  Interruptions by signals are
 * restarted internally with the remaining timeout.  Thread-safe against register,
 * modify, unregister, wake and close from other threads.
 */
int sp_poller_wait(sp_poller *p, int timeout_ms, sp_event *out, int max, uint32_t *woken);

void sp_poller_set_options(sp_poller *p, uint32_t options);

/*
 * Adaptive busy polling (off until set): before sleeping, a wait looks at the epoll set
 * without blocking for up to a budget that adapts between 0 and max_ns.  Waking a thread
 * that sleeps in epoll_wait costs tens of microseconds on a virtual machine; a peer that
 * answers within the budget is seen without that cost, at the price of a spinning CPU.
 * The budget grows (4 us, then doubling) while events keep arriving within max_ns of the
 * wait starting, and drops to 0 when one did not, so an idle poller sleeps at once.
 * max_ns 0 turns it off; values are clamped to [0, 1 s].
 */
void sp_poller_set_busy_poll(sp_poller *p, int64_t max_ns);
int64_t sp_poller_busy_poll(sp_poller *p);

/* After a wait returned SP_INTERRUPTED: milliseconds left of its timeout (-1: none). */
int sp_poller_remaining_ms(sp_poller *p);

/* Interrupt a wait from any thread (async-signal-safe). */
int sp_poller_wake(sp_poller *p);

void sp_poller_counters(sp_poller *p, sp_counters *out);

/* The signal that carries hints. */
int sp_poller_signal(sp_poller *p);

/* The thread id fds are currently owned by. */
int sp_poller_owner_tid(sp_poller *p);

/* Number of registered fds. */
int sp_poller_count(sp_poller *p);

/*
 * ---- Guest memory: accesses that survive a frontend truncating its memory file ----
 *
 * (csrc/guestmem.c.)  A vhost-user frontend shares guest memory as files it can shrink at
 * any time; touching a mapped page past the new end raises SIGBUS, fatal by default.
 * sp_guest_add() names a mapped range [base, base+len) as guest memory; it also puts a
 * SIGBUS handler first in line (again on every call, so a handler installed since --
 * Python's faulthandler, say -- comes after it; faults outside every range are passed to
 * that previous handler, or get the default action).  For a fault inside a range:
 *   - during sp_guest_read/sp_guest_write, the copy stops and returns -EFAULT;
 *   - anywhere else (a load or store the caller made itself), the whole range is replaced
 *     by zero pages so the access completes, and the caller learns of it afterwards.
 * Either way the range is marked faulted from then on, and the first fault writes 8 bytes
 * to notify_fd (an eventfd; -1 for none) so an event loop can drop the frontend.
 * Copies from or to a faulted range fail with -EFAULT without touching it: no byte the
 * guest did not write reaches the host.
 *
 * Up to 64 ranges.  Add and remove are thread-safe; the copies are async-signal-unsafe
 * only in that they must not run inside another SIGBUS handler.
 */

/* Returns the range's id (>= 0), -EINVAL for an empty or wrapping range, -ENOSPC. */
int sp_guest_add(uintptr_t base, size_t len, int notify_fd);

/* Forget a range (before unmapping it). 0, or -ENOENT if the id is not in use. */
int sp_guest_remove(int id);

/* Faults seen in the range so far (0: intact), or -ENOENT. */
int sp_guest_faults(int id);

/* Copy n bytes out of (read) or into (write) guest memory at address src/dst, which must
 * lie within one range.  0, -EFAULT (the memory is gone), or -EINVAL (not in a range). */
int sp_guest_read(char *dst, uintptr_t src, size_t n);
int sp_guest_write(uintptr_t dst, const char *src, size_t n);

#endif /* SIGPOLL_H */
