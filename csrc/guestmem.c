/*
 * Guest memory that can vanish: the SIGBUS guard.  The contract is in sigpoll.h (section
 * "Guest memory"); the reasoning in docs/virtio.md ("Guest memory that shrinks").
 *
 * A vhost-user frontend hands us its memory as files it keeps the right to truncate.  A
 * load or store to a page past the file's new end raises SIGBUS, whose default action
 * kills the backend.  Two answers, one handler:
 *
 *   - Copies (sp_guest_read/sp_guest_write) run under a per-thread recovery point: a
 *     fault inside one lands back in the copy, which returns -EFAULT.  This is the data
 *     path: no byte the guest did not write can reach the host.
 *   - Any other access to a guarded range (a ring index loaded through a memoryview, a
 *     descriptor decoded by struct: code we cannot jump out of) is repaired instead: the
 *     whole range is replaced by fresh zero pages, so the faulting instruction completes
 *     when the handler returns.  The range is marked faulted (every later copy from it
 *     fails) and its notify fd is written, so the owner drops the frontend.
 *
 * A fault anywhere else is not ours and goes to whatever handler was installed before
 * (faulthandler, or the default action).
 */
#define _GNU_SOURCE
#include "sigpoll.h"

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAX_RANGES 64

/* Fields the handler reads are atomics: it may run on any thread at any moment. */
typedef struct range {
    int used;
    uintptr_t base;
    size_t len;
    int notify_fd;
    int faults;
} range;

static range ranges[MAX_RANGES];
static pthread_mutex_t ranges_lock = PTHREAD_MUTEX_INITIALIZER;

/* The handler installed before ours; read by the handler, written with ranges_lock held. */
static struct sigaction previous;

/* Per-thread recovery point of the copy in progress.  initial-exec: the module is
 * dlopen()ed, and the default TLS model could allocate on first use inside the handler. */
#define TLS __thread __attribute__((tls_model("initial-exec")))
static TLS sigjmp_buf *copy_env;
static TLS uintptr_t copy_lo, copy_hi;
static TLS int chaining;

static range *range_at(uintptr_t addr)
{
    for (int i = 0; i < MAX_RANGES; i++) {
        range *r = &ranges[i];
        if (__atomic_load_n(&r->used, __ATOMIC_ACQUIRE) && addr - r->base < r->len)
            return r;
    }
    return NULL;
}

/* Map zero pages over the whole range (the frontend's file is gone for us anyway). */
static int repair(range *r)
{
    void *at = mmap((void *)r->base, r->len, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return at == MAP_FAILED ? -1 : 0;
}

static void pass_on(int sig, siginfo_t *si, void *uc)
{
    struct sigaction prev = previous;
    int plain = !(prev.sa_flags & SA_SIGINFO);
    if (plain && prev.sa_handler == SIG_IGN && si->si_code <= 0)
        return; /* a sent SIGBUS that was being ignored stays ignored */
    if (chaining || (plain && (prev.sa_handler == SIG_DFL || prev.sa_handler == SIG_IGN))) {
        /* The default action, as if we had never been installed: a fault re-executes the
         * access when we return and dies of it (the kernel never lets a fault be ignored);
         * a sent signal is raised again.  `chaining`: a previous handler that re-raised
         * into us (faulthandler does, after restoring its own predecessor) must not loop. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof(dfl));
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, NULL);
        if (si->si_code <= 0)
            raise(sig);
        return;
    }
    chaining = 1;
    if (plain)
        prev.sa_handler(sig);
    else
        prev.sa_sigaction(sig, si, uc);
    chaining = 0;
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    if (si->si_code > 0) { /* raised by the kernel for an access, not sent */
        int saved = errno;
        uintptr_t addr = (uintptr_t)si->si_addr;
        range *r = range_at(addr);
        if (r) {
            int first = __atomic_fetch_add(&r->faults, 1, __ATOMIC_SEQ_CST) == 0;
            if (first) {
                uint64_t one = 1;
                if (r->notify_fd >= 0 && write(r->notify_fd, &one, sizeof(one)) < 0) {
                    /* a saturated eventfd: the owner has been told already */
                }
            }
            int fixed = repair(r) == 0;
            errno = saved;
            if (copy_env && addr >= copy_lo && addr < copy_hi)
                siglongjmp(*copy_env, 1);
            if (fixed)
                return;
        }
        errno = saved;
    }
    pass_on(sig, si, uc);
}

/* Put our handler first, remembering whatever is there now (called with ranges_lock). */
static int install(void)
{
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) < 0)
        return -errno;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus)
        return 0;
    struct sigaction ours;
    memset(&ours, 0, sizeof(ours));
    ours.sa_sigaction = on_sigbus;
    /* NODEFER: a copy leaves the handler by siglongjmp without restoring a signal mask
     * (sigsetjmp(.., 0) costs no system call), so SIGBUS must never have been blocked. */
    ours.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    previous = cur;
    if (sigaction(SIGBUS, &ours, NULL) < 0)
        return -errno;
    return 0;
}

int sp_guest_add(uintptr_t base, size_t len, int notify_fd)
{
    if (len == 0 || base + len < base)
        return -EINVAL;
    pthread_mutex_lock(&ranges_lock);
    int rc = install();
    if (rc == 0) {
        rc = -ENOSPC;
        for (int i = 0; i < MAX_RANGES; i++) {
            range *r = &ranges[i];
            if (r->used)
                continue;
            r->base = base;
            r->len = len;
            r->notify_fd = notify_fd;
            __atomic_store_n(&r->faults, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&r->used, 1, __ATOMIC_RELEASE);
            rc = i;
            break;
        }
    }
    pthread_mutex_unlock(&ranges_lock);
    return rc;
}

int sp_guest_remove(int id)
{
    if (id < 0 || id >= MAX_RANGES)
        return -EINVAL;
    pthread_mutex_lock(&ranges_lock);
    int rc = ranges[id].used ? 0 : -ENOENT;
    __atomic_store_n(&ranges[id].used, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&ranges_lock);
    return rc;
}

int sp_guest_faults(int id)
{
    if (id < 0 || id >= MAX_RANGES || !__atomic_load_n(&ranges[id].used, __ATOMIC_ACQUIRE))
        return -ENOENT;
    return __atomic_load_n(&ranges[id].faults, __ATOMIC_SEQ_CST);
}

/* One guarded memcpy; guest is the side in guest memory, which must lie in one range. */
static int guarded_copy(void *dst, const void *src, uintptr_t guest, size_t n)
{
    if (n == 0)
        return 0;
    range *r = range_at(guest);
    if (!r || n > r->len - (guest - r->base))
        return -EINVAL;
    if (__atomic_load_n(&r->faults, __ATOMIC_SEQ_CST))
        return -EFAULT;
    sigjmp_buf env;
    if (sigsetjmp(env, 0)) {
        copy_env = NULL;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        return -EFAULT;
    }
    copy_lo = r->base;
    copy_hi = r->base + r->len;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    copy_env = &env;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    memcpy(dst, src, n);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    copy_env = NULL;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    /* Another access may have found the range gone while we copied zero pages. */
    return __atomic_load_n(&r->faults, __ATOMIC_SEQ_CST) ? -EFAULT : 0;
}

int sp_guest_read(char *dst, uintptr_t src, size_t n)
{
    return guarded_copy(dst, (const void *)src, src, n);
}

int sp_guest_write(uintptr_t dst, const char *src, size_t n)
{
    return guarded_copy((void *)dst, src, dst, n);
}
