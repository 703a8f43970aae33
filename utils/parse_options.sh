#!/usr/bin/env bash
# Turn "--name value" / "--name=value" arguments into assignments of already-defined shell
# variables (dashes in names become underscores). Source it after defining the defaults:
#   stage=0; nj=4; . utils/parse_options.sh
# Unknown options are errors; "--help" prints ${help_message} when the caller defines it. A value must
# have its default's kind: an integer default takes integers, a decimal default numbers, true/false
# takes true or false (so "--stage three" stops here rather than run nothing). The default is the
# script's own, before a preset (utils/apply_preset.sh records it) or an earlier flag changed it;
# variables named in ${__po_free} take any value.
# Positional arguments that follow the options are left in "$@".

declare -A __po_default_of=()
[ -n "$(declare -p __ap_default_of 2> /dev/null)" ] || declare -A __ap_default_of=()
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
  if [ -n "${__po_default_of[${__po_name}]+set}" ]; then
    __po_default="${__po_default_of[${__po_name}]}"
  else
    __po_default="${__ap_default_of[${__po_name}]-${!__po_name}}"
    __po_default_of[${__po_name}]="${__po_default}"
  fi
  [[ " ${__po_free:-} " == *" ${__po_name} "* ]] && __po_default=""
  __po_kind=""
  if [[ "${__po_default}" =~ ^-?[0-9]+$ ]]; then
    __po_kind="an integer"; __po_ok='^-?[0-9]+$'
  elif [[ "${__po_default}" =~ ^-?[0-9]*\.[0-9]+$ ]]; then
    __po_kind="a number"; __po_ok='^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$'
  elif [[ "${__po_default}" == true || "${__po_default}" == false ]]; then
    __po_kind="true or false"; __po_ok='^(true|false)$'
  fi
  if [ -n "${__po_kind}" ] && ! [[ "${__po_value}" =~ ${__po_ok} ]]; then
    echo "$0: --${__po_name} takes ${__po_kind}, got '${__po_value}'" >&2; exit 1
  fi
  printf -v "${__po_name}" '%s' "${__po_value}"
done
unset __po_name __po_value __po_default __po_kind __po_ok __po_default_of __ap_default_of
