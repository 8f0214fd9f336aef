/*
 * A test shim (LD_PRELOAD) that makes one thread stop inside a chosen system call, so a
 * race the C core must survive can be played in a fixed order instead of hoped for.
 *
 * stall_arm(call, fd, reached, go): the next call to `call` ("write" on fd `fd`, or
 * "epoll_create1", fd ignored) writes one byte to `reached`, waits for one byte on `go`,
 * and only then goes ahead.  One shot: it disarms itself.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

enum { NONE, WRITE, EPOLL_CREATE1 };

static int armed = NONE, armed_fd = -1, reached_fd = -1, go_fd = -1;

static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_epoll_create1)(int);

void stall_arm(const char *call, int fd, int reached, int go)
{
    reached_fd = reached;
    go_fd = go;
    armed_fd = fd;
    __atomic_store_n(&armed, strcmp(call, "write") == 0 ? WRITE : EPOLL_CREATE1, __ATOMIC_SEQ_CST);
}

static void stall(int which, int fd)
{
    int expect = which;
    if (__atomic_load_n(&armed, __ATOMIC_SEQ_CST) != which || (which == WRITE && fd != armed_fd))
        return;
    if (!__atomic_compare_exchange_n(&armed, &expect, NONE, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        return;
    char c = 1;
    real_write(reached_fd, &c, 1);
    while (read(go_fd, &c, 1) < 0)
        ;
}

ssize_t write(int fd, const void *buf, size_t n)
{
    if (!real_write)
        real_write = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    stall(WRITE, fd);
    return real_write(fd, buf, n);
}

int epoll_create1(int flags)
{
    if (!real_epoll_create1)
        real_epoll_create1 = (int (*)(int))dlsym(RTLD_NEXT, "epoll_create1");
    if (!real_write)
        real_write = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    stall(EPOLL_CREATE1, -1);
    return real_epoll_create1(flags);
}
