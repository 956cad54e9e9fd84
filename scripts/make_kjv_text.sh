#!/usr/bin/env bash
# How src/selfextend/evaluation/data/kjv-genesis-exodus.txt.gz was made: the King James Bible (public domain)
# from Debian's bible-kjv-text package, read out with Debian's bible-kjv reader, Genesis 1:1 to Exodus 40:38.
# Chapter headings stay; verse numbers and hard line wraps go, so the text reads as plain prose.
set -euo pipefail
work=$(mktemp -d)
cd "$work"
apt-get download bible-kjv bible-kjv-text >/dev/null
for deb in *.deb; do dpkg -x "$deb" root; done
root/usr/bin/bible -p root/usr/lib "gen1:1-exo40:38" | python3 -c '
import re, sys
text = sys.stdin.read()
chapters = re.split(r"\n\n(?=[A-Z][a-z]+ \d+\n)", text.strip())
out = []
for chapter in chapters:
    title, _, body = chapter.partition("\n")
    verses = re.sub(r"\s+", " ", body).strip()
    out.append(title.strip() + "\n" + re.sub(r" ?\b\d+ (?=[A-Z])", "\n", " " + verses).strip())
print("\n\n".join(out))
' | gzip -9n
