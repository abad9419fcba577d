#!/bin/bash
# modvisor adoption at scale (P6), native backend = systemd on the testbed: BULK engines running as units,
# modvisord killed with SIGKILL and started again, REPS rounds: exec -> all BULK modules running, and how
# many units changed MainPID or NRestarts on the way (lib/mv_adopt.py). Goal: <= 1 s, none changed.
# Run from anywhere (cargo build --release in this checkout) or set MODVISORD. Env: BULK=200 REPS=3, and
# those of lib/common.sh and lib/modvisor.sh. About 30 s. Brings the testbed up if needed (and down again);
# ends the daemons it started, by PID, and stops the modules' units (modvisor-$MV_PREFIX-*) at exit.
HERE=$(cd "$(dirname "$0")" && pwd); . "$HERE/lib/common.sh"; . "$HERE/lib/modvisor.sh"
BULK=${BULK:-200}; REPS=${REPS:-3}
mv_build
mv_init "$ANCHOR_WORK/modvisor-adopt"; S=$W/samples.tsv; : >"$S"; mv_engine_user
testbed_up; mv_bus_policy
stop_bench_units; mv_stop_units
machine_line

mv_config "$W/p6.toml" "$W/p6" systemd
mv_manifests "$W/p6/modules.d" 0 "$BULK" true no adopt-
"$PY" "$LIB/mv_adopt.py" --bulk "$BULK" --reps "$REPS" --prefix "$MV_PREFIX-adopt-" --modvisord "$MODVISORD" \
  --config "$W/p6.toml" --piddir "$MV_PIDDIR" --log "$W/p6.log" >>"$S"
mv_stop_units

"$PY" "$LIB/stats.py" --title "modvisor: adoption after kill -9 (P6), raw samples: $S" "$S"
