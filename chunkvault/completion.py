"""Shell completion for the command line, made from its parser: commands, options and their values.

``commands`` reads the argparse tree into plain tables (pure, tested without a shell); ``bash_script``
renders them as a bash completion function, so the script never falls behind the options it completes.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

FLAG, FILE, DIR, VALUE = "flag", "file", "dir", "value"


@dataclass
class Command:
    """One command's completions: its options (each with the kind of value it takes, or its choices), the
    choices of its first positional argument, and its subcommands."""

    options: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    positional: tuple[str, ...] = ()
    subcommands: dict[str, "Command"] = field(default_factory=dict)


def _value_kind(action: argparse.Action) -> str | tuple[str, ...]:
    if action.nargs == 0:
        return FLAG
    if action.choices is not None:
        return tuple(str(c) for c in action.choices)
    shown = str(action.metavar or action.dest).upper()
    if shown == "DIR" or action.dest == "target":
        return DIR
    if "FILE" in shown or shown == "PATH" or action.dest == "repo":
        return FILE  # a repository URL is most often a local path
    return VALUE


def commands(parser: argparse.ArgumentParser) -> Command:
    """The completions of ``parser`` and of each subcommand below it."""
    cmd = Command()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            cmd.subcommands = {name: commands(sub) for name, sub in action.choices.items()}
        elif action.option_strings:
            if action.help == argparse.SUPPRESS:
                continue
            kind = _value_kind(action)
            for s in action.option_strings:
                cmd.options[s] = kind
        elif action.choices is not None and not cmd.positional:
            cmd.positional = tuple(str(c) for c in action.choices)
    return cmd


def _flatten(cmd: Command, path: str = "") -> list[tuple[str, Command]]:
    out = [(path, cmd)]
    for name, sub in cmd.subcommands.items():
        out += _flatten(sub, f"{path} {name}".strip())
    return out


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def bash_script(root: Command, prog: str = "chunkvault") -> str:
    """A bash completion script: ``source <(chunkvault completion bash)``, or saved where bash-completion
    loads scripts from."""
    fn = f"_{prog.replace('-', '_')}"
    lines = [f"# bash completion for {prog}: source <({prog} completion bash)",
             f"declare -gA {fn}_subs {fn}_opts {fn}_kinds {fn}_pos"]
    for path, cmd in _flatten(root):
        key = _quoted(f"@{path}")  # bash takes no empty key: the top level's is "@"
        if cmd.subcommands:
            lines.append(f"{fn}_subs[{key}]={_quoted(' '.join(cmd.subcommands))}")
        if cmd.options:
            lines.append(f"{fn}_opts[{key}]={_quoted(' '.join(cmd.options))}")
        for opt, kind in cmd.options.items():
            if kind != FLAG:
                value = "choices " + " ".join(kind) if isinstance(kind, tuple) else kind
                lines.append(f"{fn}_kinds[{_quoted(f'@{path} {opt}')}]={_quoted(value)}")
        if cmd.positional:
            lines.append(f"{fn}_pos[{key}]={_quoted(' '.join(cmd.positional))}")
    lines.append(_BASH_FUNCTION.replace("_FN_", fn).replace("_PROG_", prog))
    return "\n".join(lines) + "\n"


# The command is the run of subcommand words before the cursor; an option that takes a value skips the word
# after it.  At the cursor: an option's value (its choices, files, directories, or nothing to offer), else an
# option, else a subcommand, the first positional's choices (while none is given), or files.
_BASH_FUNCTION = r'''
_FN_() {
    local cur="${COMP_WORDS[COMP_CWORD]}" cmd="" word kind i skip=0 given=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${COMP_WORDS[i]}"
        if ((skip)); then [[ $word == = ]] || skip=0; continue; fi  # bash splits --opt=value at the =
        if [[ $word == -* ]]; then
            [[ $word != *=* && -n ${_FN__kinds["@$cmd $word"]+set} ]] && skip=1
        elif [[ " ${_FN__subs["@$cmd"]} " == *" $word "* ]]; then
            cmd="${cmd:+$cmd }$word"
        else
            given=$((given + 1))
        fi
    done
    local prefix="" opt="${COMP_WORDS[COMP_CWORD-1]}"
    if ((skip)); then
        [[ $opt == = ]] && opt="${COMP_WORDS[COMP_CWORD-2]}"
        [[ $cur == = ]] && cur=""
        kind="${_FN__kinds["@$cmd $opt"]}"
    elif [[ $cur == --*=* ]]; then  # where COMP_WORDBREAKS holds no =, the word is whole
        kind="${_FN__kinds["@$cmd ${cur%%=*}"]}"
        prefix="${cur%%=*}="
        cur="${cur#*=}"
    fi
    if ((skip)) || [[ -n $prefix ]]; then
        case "$kind" in
            choices\ *) COMPREPLY=($(compgen -W "${kind#choices }" -- "$cur")) ;;
            file) COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null ;;
            dir) COMPREPLY=($(compgen -d -- "$cur")); compopt -o filenames 2>/dev/null ;;
            *) COMPREPLY=() ;;
        esac
        [[ -n $prefix ]] && COMPREPLY=("${COMPREPLY[@]/#/$prefix}")
        return 0
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${_FN__opts["@$cmd"]}" -- "$cur"))
    elif [[ -n ${_FN__subs["@$cmd"]} ]]; then
        COMPREPLY=($(compgen -W "${_FN__subs["@$cmd"]}" -- "$cur"))
    elif [[ -n ${_FN__pos["@$cmd"]} && $given == 0 ]]; then
        COMPREPLY=($(compgen -W "${_FN__pos["@$cmd"]}" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur")); compopt -o filenames 2>/dev/null
    fi
    return 0
}
complete -F _FN_ _PROG_'''
