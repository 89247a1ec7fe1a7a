/* Prints the options movalloc read at start-up, for security_test: run setuid,
 * it must show that MOVALLOC_* variables were ignored (secure_getenv). */
#include <stdio.h>

#include "shim/mv_options.h"

int main(void) {
  printf("stats=%d check=%d trace=%s\n", mv_options.stats, mv_options.check,
         mv_options.trace ? mv_options.trace : "(none)");
  return 0;
}
