// kv: a Redis/memcached-like key-value store. A chained hash table over 64 Ki
// possible keys (8-63 B strings) takes a random stream of SET (replace the
// value: free the old, malloc the new, 16 B-1 KiB), GET (check the value) and
// DEL (free node, key and value). Three allocations per entry with very
// different lifetimes, under a fixed-size table, as a cache server does.
#include "bench/wl_common.h"

#define KEYSPACE (64u * 1024)
#define BUCKETS (64u * 1024)

struct entry {
  struct entry *next;
  char *key;
  size_t key_len;
  void *value;
  uint32_t value_size;
  uint64_t value_tag;
};

// Key k as a string of 8-63 letters, regenerated on every use as a client
// would send it.
static size_t make_key(uint64_t k, char *buf) {
  uint64_t h = wl_mix(k + 1);
  size_t len = 8 + h % 56;
  for (size_t i = 0; i < len; i++) {
    if (i % 8 == 0) h = wl_mix(h + i);
    buf[i] = (char)('a' + (h >> (8 * (i % 8))) % 26);
  }
  return len;
}

static uint64_t hash_key(const char *s, size_t len) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a
  for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)s[i]) * 0x100000001b3ULL;
  return h;
}

static struct entry **find_slot(struct entry **table, const char *key, size_t len) {
  struct entry **pp = &table[hash_key(key, len) % BUCKETS];
  while (*pp && ((*pp)->key_len != len || memcmp((*pp)->key, key, len))) pp = &(*pp)->next;
  return pp;
}

static void set_value(struct entry *e, struct wl_rng *rng, uint64_t serial) {
  e->value_size = (uint32_t)wl_log_range(rng, 16, 1024);
  e->value_tag = wl_mix(serial);
  e->value = wl_xmalloc(e->value_size);
  wl_stamp(e->value, e->value_size, e->value_tag);
}

static uint64_t delete_entry(struct entry *e) {
  wl_check(e->value, e->value_size, e->value_tag);
  uint64_t v = e->value_tag ^ e->key_len;
  free(e->value);
  free(e->key);
  free(e);
  return v;
}

int main(int argc, char **argv) {
  struct wl_opts o = wl_parse(argc, argv, 0, 1);
  uint64_t ops = wl_scaled(3000000, o.scale);
  struct entry **table = calloc(BUCKETS, sizeof *table);
  struct wl_rng rng = wl_seed(800);
  uint64_t sum = 0, entries = 0;
  char key[64];

  for (uint64_t i = 0; i < ops; i++) {
    size_t len = make_key(wl_below(&rng, KEYSPACE), key);
    struct entry **pp = find_slot(table, key, len);
    unsigned op = (unsigned)wl_below(&rng, 10);
    if (op < 6) {  // SET
      struct entry *e = *pp;
      if (e) {
        wl_check(e->value, e->value_size, e->value_tag);
        free(e->value);
      } else {
        e = wl_xmalloc(sizeof *e);
        e->next = NULL;
        e->key = wl_xmalloc(len + 1);
        memcpy(e->key, key, len);
        e->key[len] = 0;
        e->key_len = len;
        *pp = e;
        entries++;
      }
      set_value(e, &rng, i);
    } else if (op < 9) {  // GET
      if (*pp) {
        wl_check((*pp)->value, (*pp)->value_size, (*pp)->value_tag);
        sum += (*pp)->value_tag;
      }
    } else if (*pp) {  // DEL
      struct entry *e = *pp;
      *pp = e->next;
      sum += delete_entry(e);
      entries--;
    }
  }
  sum += entries;
  for (size_t b = 0; b < BUCKETS; b++) {
    while (table[b]) {
      struct entry *e = table[b];
      table[b] = e->next;
      sum += delete_entry(e);
    }
  }
  free(table);
  wl_checksum(sum);
  return 0;
}
