// mlx-rs seeds RandomState::new() with the macOS symbol mach_approximate_time();
// provide it from the monotonic clock so binaries link on Linux.
#include <stdint.h>
#include <time.h>

uint64_t mach_approximate_time(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
