"""The HOWTO's rule language, front door: run rule text line by line, each line by its tool's dialect.

Lines are executed in order on a ``Program`` (a ``Builder``: chains with
policies and rules, plus port and protocol forwards), the way the shell script
in the HOWTO ran the real tools one after the other. Each bad line becomes one
message ``SOURCE:LINE: reason`` in ``Program.errors`` and changes nothing;
parsing never raises. The words come from ``lexer``; what each tool's words
mean is in ``dialects``.
"""

from __future__ import annotations

from masqd.firewall.builder import Builder, Env
from masqd.firewall.dialects import DIALECTS
from masqd.firewall.lexer import Bad, logical_lines, printable, split_words

__all__ = ["Bad", "Env", "Program", "MAX_ERRORS", "MAX_LINE"]

MAX_ERRORS = 1000  # a binary file fed as rules must not produce a million lines
MAX_LINE = 4096


class Program(Builder):
    """A Builder fed with rule text or argument vectors."""

    def feed_text(self, text: str, source: str) -> None:
        """Execute every command line of ``text``; errors are ``SOURCE:LINE: reason``."""
        for lineno, line in logical_lines(text):
            if len(self.errors) >= MAX_ERRORS:
                self.errors.append(f"{source}:{lineno}: too many errors, stopping")
                return
            where = f"{source}:{lineno}"
            if len(line) > MAX_LINE:
                self.errors.append(f"{where}: line longer than {MAX_LINE} characters")
                continue
            try:
                words = split_words(line)
            except Bad as exc:
                self.errors.append(f"{where}: {exc}")
                continue
            if words:
                self.feed_argv(words, where)

    def feed_argv(self, argv: list[str], where: str) -> bool:
        """Execute one command; on refusal record ``WHERE: reason`` and change nothing."""
        nwarn = len(self.warnings)
        try:
            self._command(list(argv), where)
            return True
        except (Bad, ValueError, OverflowError) as exc:  # ValueError...: belt and braces, never a traceback
            del self.warnings[nwarn:]
            self.errors.append(f"{where}: {exc}")
            return False

    def _command(self, argv: list[str], where: str) -> None:
        if argv and argv[-1] == "&":  # "ipfwd --masq 10.0.0.2 50 &" from rc.local
            argv = argv[:-1]
        if not argv:
            raise Bad("empty command")
        run = DIALECTS.get(argv[0].rsplit("/", 1)[-1])
        if run is None:
            raise Bad(
                f"unknown command {printable(argv[0])} (expected ipchains, ipfwadm, ipmasqadm, ipportfw or ipfwd)"
            )
        run(self, argv[1:], where)
