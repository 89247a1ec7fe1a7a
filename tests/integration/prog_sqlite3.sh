#!/usr/bin/env bash
# sqlite3 shell: tables filled by recursive CTEs, indexes, joins, aggregates,
# an update/delete churn, VACUUM and integrity_check on an on-disk database.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
it_init sqlite3
it_need sqlite3 command -v sqlite3

workload() {
  sqlite3 -bail test.db <<'SQL'
PRAGMA cache_size = -20000;
CREATE TABLE cust(id INTEGER PRIMARY KEY, name TEXT, region INTEGER);
CREATE TABLE ord(id INTEGER PRIMARY KEY, cust INTEGER, amount INTEGER, note TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
INSERT INTO cust SELECT i, printf('customer-%05d-%s', i, hex(i * 7919)), i % 17 FROM n;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
INSERT INTO ord SELECT i, (i * 7919) % 5000 + 1, (i * 104729) % 100003,
  substr(printf('%.*c', (i % 300) + 1, 'x') || printf('%d', i), 1, 400) FROM n;
CREATE INDEX ord_cust ON ord(cust);
CREATE INDEX ord_amount ON ord(amount, id);
CREATE INDEX cust_region ON cust(region, name);
SELECT 'counts', (SELECT count(*) FROM cust), (SELECT count(*) FROM ord);
SELECT 'by region', c.region, count(*), sum(o.amount), max(length(o.note))
  FROM ord o JOIN cust c ON c.id = o.cust GROUP BY c.region ORDER BY c.region;
SELECT 'top', c.name, sum(o.amount) AS s FROM ord o JOIN cust c ON c.id = o.cust
  GROUP BY c.id ORDER BY s DESC, c.id LIMIT 5;
SELECT 'window', id, amount, rank() OVER (ORDER BY amount DESC, id) FROM ord
  WHERE amount > 99990 ORDER BY id;
SELECT 'distinct', count(DISTINCT amount), count(DISTINCT note) FROM ord;
UPDATE ord SET note = note || note WHERE id % 7 = 0;
DELETE FROM ord WHERE id % 5 = 0;
SELECT 'after churn', count(*), sum(length(note)), total(amount) FROM ord;
SELECT 'group_concat', length(group_concat(name, ',')) FROM cust;
VACUUM;
PRAGMA integrity_check;
SELECT 'checksum', sum(id * 31 + amount), sum(length(note) * id % 1000003) FROM ord;
SQL
  # Shows that the sqlite3 process itself runs on the preloaded library.
  sqlite3 test.db ".system grep -qF \"\$MOVALLOC_LIB\" /proc/\$PPID/maps && : >\"\$IT_MAPPED_FILE\"" \
    'SELECT count(*) FROM ord;'
}

it_compare_runs workload
