#!/usr/bin/env bash
# File helpers of the stage scripts; source it (". utils/files.sh"). merge writes aside, under a name
# of its own ("<output>.<pid>.tmp"), and renames: an interrupted stage never leaves a file that looks
# complete, and two runs never share a temporary name. keep_log keeps an earlier run's log rather
# than overwrite it. job_files reads ${nj}.

job_files() {  # job_files <prefix> <suffix>: <prefix>1<suffix> ... <prefix>${nj}<suffix>, every job's by name
  local j
  for j in $(seq 1 "${nj}"); do echo "$1${j}$2"; done
}

merge() {  # merge <output> <command...>: the command's output written aside, then renamed (a missing input fails)
  local out=$1 tmp="$1.$$.tmp"
  shift
  "$@" > "${tmp}" || { rm -f "${tmp}"; return 1; }
  mv "${tmp}" "${out}"
}

keep_log() {  # keep_log <log>: an earlier run's log moves aside to <log>.1, .2, ... rather than be overwritten
  local n=1
  [ -f "$1" ] || return 0
  while [ -e "$1.${n}" ]; do n=$((n + 1)); done
  mv "$1" "$1.${n}"
}
