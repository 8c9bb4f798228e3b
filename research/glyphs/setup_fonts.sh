#!/bin/sh
# Installs the CJK font packages of the glyphs study (Debian/Ubuntu, as root) and records the
# exact version of each in research/glyphs/results/font_packages.tsv (or the file given as the
# first argument), so that a glyph folder built from /usr/share/fonts can be rebuilt.
#
#   sudo sh research/glyphs/setup_fonts.sh            # install + record
#   RECORD_ONLY=1 sh research/glyphs/setup_fonts.sh   # record what is installed
#
# Each package's licence comes with it: /usr/share/doc/<package>/copyright.
set -eu

PACKAGES="fonts-noto-cjk fonts-noto-cjk-extra
fonts-arphic-ukai fonts-arphic-uming fonts-arphic-bkai00mp fonts-arphic-bsmi00lp
fonts-arphic-gbsn00lp fonts-arphic-gkai00mp
fonts-wqy-zenhei fonts-wqy-microhei
fonts-ipafont-gothic fonts-ipafont-mincho fonts-ipaexfont-gothic fonts-ipaexfont-mincho
fonts-ipamj-mincho fonts-takao-gothic fonts-takao-mincho
fonts-horai-umefont fonts-hanazono fonts-vlgothic fonts-sawarabi-gothic fonts-sawarabi-mincho
fonts-motoya-l-cedar fonts-motoya-l-maruberi
fonts-cwtex-fs fonts-cwtex-heib fonts-cwtex-kai fonts-cwtex-ming fonts-cwtex-yen
fonts-droid-fallback fonts-migmix fonts-komatuna fonts-monapo
fonts-kouzan-mouhitsu fonts-aoyagi-kouzan-t"

HERE=$(cd "$(dirname "$0")" && pwd)
RECORD=${1:-$HERE/results/font_packages.tsv}

if [ -z "${RECORD_ONLY:-}" ]; then
    apt-get update
    # shellcheck disable=SC2086  # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PACKAGES
fi

# package <TAB> version <TAB> architecture, sorted; a missing package is an error.
TMP="$RECORD.tmp.$$"
# shellcheck disable=SC2086
dpkg-query -W -f='${Package}\t${Version}\t${Architecture}\n' $PACKAGES | sort > "$TMP"
mv "$TMP" "$RECORD"
echo "recorded $(wc -l < "$RECORD") font packages in $RECORD"
