/* libunwind opens a pipe of its own at its first unwind (tdep_init, to check
 * addresses before it reads them) and keeps it for good: at the two lowest
 * free numbers, inside the program's range, where a program that lists its
 * descriptors sees two it never opened (Python's subprocess tests compare
 * them with what they passed down). A pipe made while the profiler unwinds
 * goes above the program's range, as movalloc's other descriptors do
 * (mv_fd_high); libunwind keeps the numbers this returns. Every other call is
 * the system call, as glibc's pipe2 is.
 */
#include <stdbool.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "arena/mv_types.h"
#include "compactor/mv_backend_int.h" /* mv_fd_high */
#include "profiler/mv_profile.h"

MV_EXPORT int pipe2(int fds[2], int flags) {
  int rc = (int)syscall(SYS_pipe2, fds, flags);
  if (rc == 0 && __builtin_expect(mv_prof_unwinding, 0)) {
    fds[0] = mv_fd_high(fds[0]);
    fds[1] = mv_fd_high(fds[1]);
  }
  return rc;
}
