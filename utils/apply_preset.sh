#!/usr/bin/env bash
# Source with a script's own arguments, before utils/parse_options.sh:
#   . utils/apply_preset.sh "$@"
# A "--preset NAME" (or --preset=NAME) among them sources conf/preset/NAME.sh first, so that the flags
# given explicitly, which parse_options.sh applies next, override the preset's values. An unknown
# preset stops the script with the list of those that exist. Needs utils/log.sh.

for ((__ap_i = 1; __ap_i <= $#; __ap_i++)); do
  case "${!__ap_i}" in
    --preset) __ap_next=$((__ap_i + 1)); preset=${!__ap_next:-} ;;
    --preset=*) preset=${!__ap_i#--preset=} ;;
  esac
done
unset __ap_i __ap_next
if [ -n "${preset:-}" ]; then
  if [ ! -f "conf/preset/${preset}.sh" ]; then
    log "Error: unknown preset '${preset}'. Available: $(ls conf/preset | sed -n 's/\.sh$//p' | tr '\n' ' ')"
    exit 1
  fi
  # the script's own defaults, before the preset (and what it sources) changes them: parse_options.sh
  # checks a flag's kind against these
  declare -A __ap_default_of=()
  for __ap_name in $(compgen -v); do
    [ -z "${!__ap_name+set}" ] || __ap_default_of[${__ap_name}]="${!__ap_name}"
  done
  unset __ap_name
  . "conf/preset/${preset}.sh"
fi
