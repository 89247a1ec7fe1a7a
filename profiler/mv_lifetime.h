/* Lifetime classes (the LLAMA idea, ASPLOS'20): MOVALLOC_PROFILE_LONGLIVED
 * names a file of allocation sites an earlier profiled run found long-lived
 * (MOVALLOC_PROFILE_LONGLIVED_OUT writes it). Allocations from those sites get
 * pages in arenas of their own (MV_LIFE_LONG), so short-lived churn does not
 * leave holes in the arenas that hold long-lived data.
 *
 * A site is the return address into malloc's caller (the first frame outside
 * the allocator), written as module and offset so that it survives address
 * space randomisation, and resolved against the objects loaded when movalloc
 * starts (objects dlopen'ed later are not routed). Through malloc the address
 * is one load (__builtin_return_address); through calloc, realloc, the aligned
 * family and operator new, a short libunwind backtrace finds it. Programs that
 * allocate through a wrapper of their own have one site per wrapper. */
#ifndef MV_LIFETIME_H
#define MV_LIFETIME_H

#include <stdbool.h>
#include <stdint.h>

/* Set once the file is loaded: every malloc goes to the slow path, which asks
 * mv_lifetime_class. Hidden: tested directly, not through the GOT. */
extern bool mv_lifetime_on __attribute__((visibility("hidden")));

/* From movalloc's constructor: reads the file and resolves its sites (logs
 * what it could not use). */
void mv_lifetime_start(const char *path);

/* MV_LIFE_LONG if the allocation whose caller returns to ra (or, when ra is
 * inside the allocator, the first frame outside it) is a listed site. */
unsigned mv_lifetime_class(uintptr_t ra);

/* The loaded object holding addr: its load bias and its name ("[exe]" for the
 * main program) into name; false if none. Never allocates. */
bool mv_lifetime_object_of(uintptr_t addr, uintptr_t *bias, char *name, unsigned cap);

#endif /* MV_LIFETIME_H */
