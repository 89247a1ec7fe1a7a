"""Compiler options shared by every C target that ships in libmovalloc."""

# -fvisibility=hidden: only names marked MV_EXPORT leave libmovalloc.so, so the
# preloaded library interposes the malloc family and nothing else.
# -ftls-model=initial-exec: the thread heap pointer is one %fs-relative load.
MV_COPTS = [
    "-fvisibility=hidden",
    "-ftls-model=initial-exec",
    "-fno-plt",
    "-fPIC",
    "-D_GNU_SOURCE",
    "-Werror=implicit-function-declaration",
    "-Wno-unused-parameter",
]

# Tests: GoogleTest is C++; sources include movalloc's C headers.
MV_TEST_COPTS = ["-Wno-missing-field-initializers", "-Wno-unused-parameter"]
