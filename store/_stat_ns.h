/* A stat's modification and change times as the manifest format holds them (int64 nanoseconds since
 * the epoch: 1677 to 2262), for the native stat readers. */
#ifndef CHUNKVAULT_STAT_NS_H
#define CHUNKVAULT_STAT_NS_H

#include <limits.h>
#include <sys/stat.h>
#include <time.h>

#ifdef __APPLE__
#define MTIME(st) ((st).st_mtimespec)
#define CTIME(st) ((st).st_ctimespec)
#else
#define MTIME(st) ((st).st_mtim)
#define CTIME(st) ((st).st_ctim)
#endif

/* A time beyond what int64 nanoseconds hold is held at the nearest end, not wrapped around (tv_sec * 1e9
 * overflowed: 2300 came back as 1715). */
static inline long long ns_of(struct timespec t) {
    if (t.tv_sec > 9223372035LL)
        return LLONG_MAX;
    if (t.tv_sec < -9223372035LL)
        return LLONG_MIN;
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

#endif
