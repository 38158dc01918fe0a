"""Keep TensorFlow's C++ log lines out of the terminal.

TensorFlow logs from C++ straight to the process's standard error, much of it before any
setting can reach it: absl's "before InitializeLog" lines (`I0000 ... oneDNN custom
operations are on`, `Could not find cuda drivers`) ignore TF_CPP_MIN_LOG_LEVEL, and on a
machine without a GPU device set-up logs `E0000 ... failed call to cuInit`. None of them is
about the user's run, and a user who reads "error" stops trusting it.

`hide_tensorflow_logs()` must run before TensorFlow is imported. It sets the log levels
TensorFlow does respect, and puts a filter between file descriptor 2 and the real standard
error: a thread copies every line through except absl/glog-formatted lines
(`E0000 00:00:...`, `W1125 ...`) and their indented continuation lines. Python's own
warnings and tracebacks pass unchanged; they are flushed through before the process exits.
`driver.py --verbose` skips all this.
"""

import atexit
import os
import re
import sys
import threading

# absl/glog: a severity letter, MMDD, a time, a thread id, file:line]
TENSORFLOW_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^ ]+:\d+\]")
ABSL_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def hide_tensorflow_logs():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    real_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    copier = threading.Thread(target=_copy_lines, args=(read_end, real_stderr), daemon=True)
    copier.start()

    def drain():
        sys.stderr.flush()
        os.dup2(real_stderr, 2)  # closes the pipe's last write end, so the copier sees its end
        copier.join(timeout=5)

    atexit.register(drain)


def _copy_lines(read_end, real_stderr):
    hiding = False  # inside a hidden message: its continuation lines go too
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                hiding = _hidden(line, hiding)
                if not hiding:
                    os.write(real_stderr, line + b"\n")
    if pending and not _hidden(pending, hiding):
        os.write(real_stderr, pending)


def _hidden(line, hiding):
    """Whether a line is TensorFlow's: a log line, absl's preamble, or a continuation (an
    indented, blank or instruction-set line) of a hidden one."""
    if TENSORFLOW_LINE.match(line) or line.startswith(ABSL_PREAMBLE):
        return True
    return hiding and (not line.strip() or line[:1] in (b" ", b"\t") or line.startswith(b"To enable the following"))
