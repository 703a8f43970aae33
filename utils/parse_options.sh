#!/usr/bin/env bash
# Turn "--name value" / "--name=value" arguments into assignments of already-defined shell
# variables (dashes in names become underscores). Source it after defining the defaults:
#   stage=0; nj=4; . utils/parse_options.sh
# Unknown options are errors; "--help" prints ${help_message} when the caller defines it.
# Positional arguments that follow the options are left in "$@".

while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h) echo "${help_message:-Usage: $0 [--option value ...]}" >&2; exit 0 ;;
    --*=*) __po_name="${1%%=*}"; __po_value="${1#*=}"; shift ;;
    --*)
      __po_name="$1"
      if [ $# -lt 2 ]; then echo "$0: option $1 needs a value" >&2; exit 1; fi
      __po_value="$2"; shift 2 ;;
    *) break ;;
  esac
  __po_name="${__po_name#--}"; __po_name="${__po_name//-/_}"
  if ! declare -p "${__po_name}" >/dev/null 2>&1; then
    echo "$0: unknown option --${__po_name} (see --help)" >&2; exit 1
  fi
  printf -v "${__po_name}" '%s' "${__po_value}"
done
unset __po_name __po_value
