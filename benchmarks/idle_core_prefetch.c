/* A helper thread that reads a list of buffers (every cache line) when told, so that they are in the shared L3
   when a later product reads them; it stops early while `se_busy(1)` says a parallel product runs. For
   benchmarks/idle_core_prefetch.py only: an experiment, not part of the library. */
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>

#define MAX_BUFFERS 16

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t told = PTHREAD_COND_INITIALIZER;
static const char *buffers[MAX_BUFFERS];
static size_t sizes[MAX_BUFFERS];
static int count, started;
static long asked;
static atomic_int busy;
static volatile long sink;
static pthread_t thread;

static void *reader(void *unused) {
    (void)unused;
    long seen = 0;
    for (;;) {
        pthread_mutex_lock(&lock);
        while (asked == seen)
            pthread_cond_wait(&told, &lock);
        seen = asked;
        const char *p[MAX_BUFFERS];
        size_t s[MAX_BUFFERS];
        const int n = count;
        for (int i = 0; i < n; i++) {
            p[i] = buffers[i];
            s[i] = sizes[i];
        }
        pthread_mutex_unlock(&lock);
        long sum = 0;
        for (int i = 0; i < n; i++)
            for (size_t k = 0; k < s[i]; k += 64) {
                if ((k & 65535) == 0 && atomic_load_explicit(&busy, memory_order_relaxed))
                    goto done;
                sum += p[i][k];
            }
    done:
        sink = sum;
    }
    return NULL;
}

/* read these buffers now (returns at once; the helper thread reads them) */
void se_prefetch(const char **p, const size_t *s, int n) {
    pthread_mutex_lock(&lock);
    if (!started)
        started = pthread_create(&thread, NULL, reader, NULL) == 0;
    count = n < MAX_BUFFERS ? n : MAX_BUFFERS;
    for (int i = 0; i < count; i++) {
        buffers[i] = p[i];
        sizes[i] = s[i];
    }
    asked++;
    pthread_cond_signal(&told);
    pthread_mutex_unlock(&lock);
}

void se_busy(int b) { atomic_store(&busy, b); }
