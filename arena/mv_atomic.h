/* C11 atomics, also readable by the C++ tests that include movalloc's headers. */
#ifndef MV_ATOMIC_H
#define MV_ATOMIC_H

#ifdef __cplusplus
extern "C++" {
#include <atomic>
}
#define _Atomic(T) std::atomic<T>
using std::atomic_compare_exchange_strong;
using std::atomic_compare_exchange_strong_explicit;
using std::atomic_compare_exchange_weak_explicit;
using std::atomic_exchange;
using std::atomic_exchange_explicit;
using std::atomic_fetch_add;
using std::atomic_load;
using std::atomic_load_explicit;
using std::atomic_store;
using std::atomic_store_explicit;
using std::memory_order_acquire;
using std::memory_order_relaxed;
using std::memory_order_release;
#else
#include <stdatomic.h>
#endif

#endif /* MV_ATOMIC_H */
