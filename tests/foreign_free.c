/* Run under LD_PRELOAD=libmovalloc.so by misuse_table_test: frees a block that
 * glibc's own malloc handed out (__libc_malloc bypasses the preload, as memory
 * allocated before movalloc was loaded would), asks malloc_usable_size about
 * it, and checks that movalloc left it alone. Prints "intact" when it did. */
#include <malloc.h>
#include <stdio.h>
#include <string.h>

void *__libc_malloc(size_t size);
void __libc_free(void *p);

int main(void) {
  char *g = __libc_malloc(100);
  memset(g, 7, 100);
  asm volatile("" : : "r"(g) : "memory"); /* the stores happen: free(g) does not make them dead */
  free(g);
  size_t usable = malloc_usable_size(g);
  for (int i = 0; i < 100; i++)
    if (g[i] != 7) {
      printf("changed\n");
      return 1;
    }
  printf("intact usable=%zu\n", usable);
  __libc_free(g);
  return 0;
}
