#!/usr/bin/env bash
# Fail where a shared object defines libstdc++'s stream or locale code itself instead of taking
# it from the shared libstdc++.so.6: the first GPU session's CUDA build of _C carried its own
# std::ostream::_M_insert<long>, and a C++ error message with a number in it then segfaulted
# (docs/development.md). setup.py links libstdc++ as the shared library; this checks the result.
#
# What counts: a symbol (defined, global or local, from the symbol table or the dynamic one)
# that is a member, vtable or type_info of std::basic_ostream/basic_istream/basic_iostream
# (std::ostream, std::istream, std::iostream; std::ostream::_M_insert<long> among them),
# std::basic_ios, std::ios_base, std::locale or std::codecvt. Matched on the mangled names: a
# demangled one starts with its return type, and an ordinary extension holds local copies of
# header code returning std::basic_ostream& (an inlined operator<<'s clone), which are fine.
#
# Usage: scripts/check_libstdcxx.sh [SO...]   (default: every .so under earlyexit_kernels/,
# the extension `pip install -e .` builds in place; none there: nothing to check, exit 0)
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v nm >/dev/null 2>&1; then
    echo "check-libstdcxx: nm not found (binutils)" >&2
    exit 1
fi
if (($# == 0)); then
    mapfile -t SOS < <(find earlyexit_kernels -name '*.so' -type f | sort)
    if ((${#SOS[@]} == 0)); then
        echo "check-libstdcxx: no extension built under earlyexit_kernels/: nothing to check"
        exit 0
    fi
else
    SOS=("$@")
fi
DEMANGLE=(cat)
command -v c++filt >/dev/null 2>&1 && DEMANGLE=(c++filt)
# _ZN[K]<class>... members, _ZT[VIS]<class> vtable/type_info/name, _ZT[hv]..._N<class> thunks.
CLASSES='So|Si|Sd|St13basic_ostream|St13basic_istream|St14basic_iostream|St9basic_ios|St8ios_base|St6locale|St7codecvt'
PATTERN="^_Z(T[VIS]N?|T[hv][0-9n_]*N|N)?K?($CLASSES)"
status=0
for so in "${SOS[@]}"; do
    if [[ ! -f "$so" ]]; then
        echo "check-libstdcxx: $so: no such file" >&2
        status=1
        continue
    fi
    found=$({
        nm --defined-only "$so" 2>/dev/null
        nm -D --defined-only "$so" 2>/dev/null
    } | awk 'NF >= 3 { print $3 }' | sed 's/@.*//' | grep -E "$PATTERN" | sort -u)
    if [[ -n "$found" ]]; then
        count=$(wc -l <<<"$found")
        echo "check-libstdcxx: FAILED: $so defines $count symbols of libstdc++'s streams and locales itself:" >&2
        # std::ostream::_M_insert<long> and its kin first: the first GPU session's crash.
        { grep -F _M_insert <<<"$found"; grep -vF _M_insert <<<"$found"; } | "${DEMANGLE[@]}" | head -n 20 | sed 's/^/    /' >&2
        ((count <= 20)) || echo "    ... and $((count - 20)) more" >&2
        echo "check-libstdcxx: libstdc++ was linked into it: -static-libstdc++ on the link line, or a libstdc++.a" \
            "found ahead of the shared library. Link libstdc++ as the shared library: setup.py's" \
            "extension_link_args (-l:libstdc++.so.6, after the objects) on the extension, no -static-libstdc++" \
            "in LDFLAGS, LDSHARED, CXX or Python's sysconfig; the build prints its link line" \
            "('earlyexit_kernels build: link args'). A copy of libstdc++ in the extension segfaults on a C++" \
            "error message with a number in it (docs/development.md)." >&2
        status=1
    else
        echo "check-libstdcxx: $so takes libstdc++'s streams and locales from the shared library"
    fi
done
exit $status
