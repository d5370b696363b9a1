#!/usr/bin/env bash
# Fetch the translated manual pages that the token-level balance study uses as its German, French
# and Spanish domains (bench/balance_study.py --tokens, core/domains.py study_sources()).
#     bash scripts/study-corpus.sh                 # -> data/manpages/{de,fr,es}/man*/...
#     MOE_STUDY_CORPUS=/some/dir bash scripts/study-corpus.sh
# Debian/Ubuntu only: `apt-get download` fetches the packages manpages-de, manpages-fr and
# manpages-es (.deb files, nothing is installed) into a temporary directory, `dpkg-deb -x` unpacks
# them, and their usr/share/man/<lang>/ trees (gzip-compressed groff source) are copied to the
# target. Re-running replaces the target's language folders. VERSIONS in the target records the
# package versions, so two machines can tell whether they built the same corpus.
# Nothing in the project downloads at run time: the study and the tests read only this directory
# (the path in MOE_STUDY_CORPUS, else data/manpages/ in the checkout, which git ignores).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${MOE_STUDY_CORPUS:-data/manpages}
LANGS=${STUDY_LANGS:-"de fr es"}
for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "study-corpus.sh: needs $tool (Debian/Ubuntu); on other systems unpack the manpages-de/-fr/-es .deb files by hand into $DEST/<lang>/" >&2; exit 1; }
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
chmod 755 "$TMP"  # apt's _apt user writes the .deb files here
pkgs=()
for l in $LANGS; do pkgs+=("manpages-$l"); done
(cd "$TMP" && apt-get download "${pkgs[@]}") || {
  echo "study-corpus.sh: apt-get download ${pkgs[*]} failed; run 'apt-get update' first (as root) or check the network" >&2; exit 1; }
mkdir -p "$DEST"
: > "$DEST/VERSIONS"
for l in $LANGS; do
  deb=$(ls "$TMP"/manpages-"$l"_*.deb)
  dpkg-deb -x "$deb" "$TMP/x-$l"
  [ -d "$TMP/x-$l/usr/share/man/$l" ] || { echo "study-corpus.sh: $deb has no usr/share/man/$l" >&2; exit 1; }
  rm -rf "${DEST:?}/$l"
  cp -r "$TMP/x-$l/usr/share/man/$l" "$DEST/$l"
  echo "manpages-$l $(dpkg-deb -f "$deb" Version) $(sha256sum "$deb" | cut -d' ' -f1)" >> "$DEST/VERSIONS"
  echo "$DEST/$l: $(find "$DEST/$l" -type f | wc -l) manual pages"
done
cat "$DEST/VERSIONS"
