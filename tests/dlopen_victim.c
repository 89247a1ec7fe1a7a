/* Loaded and unloaded by heap_test: allocates in its constructor, frees in its
 * destructor, and hands out blocks the loader frees. */
#include <stdlib.h>
#include <string.h>

static char *kept;

__attribute__((constructor)) static void victim_load(void) {
  kept = malloc(100000);
  memset(kept, 7, 100000);
}

__attribute__((destructor)) static void victim_unload(void) { free(kept); }

char *victim_strdup(const char *s) { return strdup(s); }

int victim_sum(void) {
  int sum = 0;
  for (int i = 0; i < 100000; i++) sum += kept[i];
  return sum;
}
