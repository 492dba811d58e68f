"""The test runner `reward.code` ships into the sandbox (compiled, started by a loader that set sys.path): runs a
solution's tests so that the solution cannot forge the verdict. Standard library only; it runs under the
sandbox's own Python.

It is the sandbox's PID 1, which ignores signals from the rest of the sandbox; the sandbox has no /proc and
refuses ptrace and process_vm_*, so no other process can read its memory or open its descriptors. It compiles
solution.py and tests.py, forks the solution's process, and only then reads the pass marker from its stdin. The
solution's process has /dev/null for stdin and stderr for stdout and runs solution.py in a fresh namespace; the
tests run here, with the real builtins, calling the solution through a pipe. Arguments and results travel as
plain data (`encode`) and are rebuilt here as exact builtin types, so `f(x) == y` is Python's comparison of plain
values; anything else comes back as a handle that equals nothing but the same handle. The marker is printed, on
this process's own stdout, only when every test ran. (The codec is hand-written: importing json costs 7 ms a run
inside the sandbox.)
"""

import builtins
import _signal  # not `signal`, whose enums cost 5 ms a run to import
import posix  # not `os`, whose imports cost 2 ms a run: the runner starts without site, which imports it
import sys

MESSAGE_LIMIT_BYTES = 64 << 20
DEPTH_LIMIT = 200
TOKEN_LIMIT_BYTES = 5000  # an int's digits (Python's own limit is 4300) or a float's repr
_EXCEPTIONS = {name: value for name, value in vars(builtins).items()
               if isinstance(value, type) and issubclass(value, Exception)}
_CONTAINERS = {b"L": list, b"U": tuple, b"E": set, b"Z": frozenset}


class RemoteError(Exception):
    """An exception the solution raised whose type is not one of Python's built-in exceptions."""


class ProtocolError(Exception):
    """The solution's process sent something that is not a well-formed message."""


def encode(value: object, handles: dict[int, object] | None) -> bytes:
    """Plain data as tagged bytes; anything else as a handle (solution side) or refused (runner side, `None`)."""
    parts: list[bytes] = []
    _encode_into(value, handles, parts)
    return b"".join(parts)


def _encode_into(value: object, handles: dict[int, object] | None, parts: list[bytes]) -> None:
    if value is None or isinstance(value, bool):
        parts.append(b"N" if value is None else b"T" if value else b"F")
    elif isinstance(value, int):
        parts.append(b"I%d;" % int(value))
    elif isinstance(value, float):
        parts.append(b"D" + repr(float(value)).encode() + b";")
    elif isinstance(value, (str, bytes, bytearray)):
        data = str.__str__(value).encode("utf-8", "surrogatepass") if isinstance(value, str) else bytes(value)
        parts.append(b"%s%d:" % (b"S" if isinstance(value, str) else b"B", len(data)) + data)
    elif isinstance(value, dict):
        parts.append(b"M%d:" % len(value))
        for key, item in list(value.items()):
            _encode_into(key, handles, parts)
            _encode_into(item, handles, parts)
    elif isinstance(value, (list, tuple, set, frozenset)):
        tag = next(tag for tag, kind in _CONTAINERS.items() if isinstance(value, kind))
        items = list(value)
        parts.append(b"%s%d:" % (tag, len(items)))
        for item in items:
            _encode_into(item, handles, parts)
    elif isinstance(value, Remote):
        parts.append(b"H%d;" % value.handle)
    elif handles is None:
        raise TypeError(f"{type(value).__name__} values cannot be sent to the solution (plain data only)")
    else:
        handles[id(value)] = value
        parts.append(b"H%d;" % id(value))


def decode(data: bytes, resolve) -> object:
    """`encode`'s bytes rebuilt as exact builtin types, handles through `resolve`; anything malformed refused."""
    reader = _Reader(data, resolve)
    value = reader.value(0)
    if reader.at != len(data):
        raise ProtocolError("bytes after the value")
    return value


class _Reader:
    def __init__(self, data: bytes, resolve) -> None:
        self.data, self.at, self.resolve = data, 0, resolve

    def token(self, end: bytes) -> bytes:
        stop = self.data.find(end, self.at, self.at + TOKEN_LIMIT_BYTES)
        if stop < 0:
            raise ProtocolError("a number runs on")
        text, self.at = self.data[self.at:stop], stop + 1
        return text

    def count(self) -> int:
        text = self.token(b":")
        if not text.isdigit():
            raise ProtocolError("a length is digits")
        number = int(text)
        if number > len(self.data) - self.at:  # every item takes at least a byte
            raise ProtocolError("a length beyond the message")
        return number

    def value(self, depth: int) -> object:
        if depth > DEPTH_LIMIT or self.at >= len(self.data):
            raise ProtocolError("nested too deep" if depth > DEPTH_LIMIT else "the message ends early")
        tag = self.data[self.at:self.at + 1]
        self.at += 1
        try:
            if tag in (b"N", b"T", b"F"):
                return None if tag == b"N" else tag == b"T"
            if tag == b"I":
                return int(self.token(b";"))
            if tag == b"D":
                return float(self.token(b";"))
            if tag == b"H":
                return self.resolve(int(self.token(b";")))
            if tag in (b"S", b"B"):
                size = self.count()
                chunk, self.at = self.data[self.at:self.at + size], self.at + size
                return chunk.decode("utf-8", "surrogatepass") if tag == b"S" else bytes(chunk)
            if tag == b"M":
                size = self.count()
                return {self.value(depth + 1): self.value(depth + 1) for _ in range(size)}
            if tag in _CONTAINERS:
                size = self.count()
                return _CONTAINERS[tag](self.value(depth + 1) for _ in range(size))
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"unreadable {tag!r}: {e}") from None
        raise ProtocolError(f"unknown tag {tag!r}")


class Channel:
    """Length-prefixed messages over a pair of pipes, each at most MESSAGE_LIMIT_BYTES."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.reader, self.writer = open(read_fd, "rb"), open(write_fd, "wb")

    def send(self, message: bytes) -> None:
        self.writer.write(len(message).to_bytes(8, "big") + message)
        self.writer.flush()

    def receive(self) -> bytes:
        header = self.reader.read(8)
        if len(header) < 8:
            raise ProtocolError("the solution's process ended")
        size = int.from_bytes(header, "big")
        if size > MESSAGE_LIMIT_BYTES:
            raise ProtocolError(f"a message of {size} bytes")
        message = self.reader.read(size)
        if len(message) < size:
            raise ProtocolError("the solution's process ended mid-message")
        return message


class Remote:
    """A value the solution holds (a function, an object): calls, attributes, items, length, iteration and
    truth go to the solution; it equals only the same handle, and nothing else is defined on it."""

    __slots__ = ("handle", "_client")

    def __init__(self, handle: int, client: "Client") -> None:
        object.__setattr__(self, "handle", handle)
        object.__setattr__(self, "_client", client)

    def __call__(self, *args, **kwargs):
        return self._client.ask("call", self, args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._client.ask("getattr", self, name)

    def __getitem__(self, key):
        return self._client.ask("getitem", self, key)

    def __len__(self) -> int:
        return self._client.ask_type(int, "len", self)

    def __bool__(self) -> bool:
        return self._client.ask_type(bool, "bool", self)

    def __contains__(self, item) -> bool:
        return self._client.ask_type(bool, "contains", self, item)

    def __iter__(self):
        iterator = self._client.ask("iter", self)
        while True:
            try:
                yield self._client.ask("next", iterator)
            except StopIteration:
                return

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and other.handle == self.handle

    def __hash__(self) -> int:
        return hash(self.handle)

    def __repr__(self) -> str:
        return f"<solution object {self.handle}>"


class Client:
    """The runner's end of the channel: one request, one answer."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def receive(self) -> object:
        return decode(self.channel.receive(), lambda handle: Remote(handle, self))

    def ask(self, op: str, target: Remote, *args: object) -> object:
        self.channel.send(encode((op, target, args), None))
        answer = self.receive()
        if type(answer) is tuple and len(answer) == 2 and answer[0] == "value":
            return answer[1]
        if type(answer) is tuple and len(answer) == 3 and answer[0] == "raised":
            name, text = str(answer[1]), str(answer[2])
            raise _EXCEPTIONS.get(name, RemoteError)(f"{name[:100]} in the solution: {text[:2000]}")
        raise ProtocolError("an answer holds a value or an exception")

    def ask_type(self, kind: type, op: str, *args: object) -> object:
        value = self.ask(op, *args)
        if type(value) is not kind:
            raise TypeError(f"the solution answered {type(value).__name__} where {kind.__name__} was due")
        return value


OPERATIONS = {"call": lambda target, args, kwargs: target(*args, **kwargs), "getattr": getattr,
              "getitem": lambda target, key: target[key], "len": len, "bool": bool,
              "contains": lambda target, item: item in target, "iter": iter, "next": next}


def serve(solution, channel: Channel) -> None:
    """The solution's process: run solution.py's code, send its names, then answer requests until the pipe closes."""
    namespace = {"__name__": "solution", "__builtins__": builtins}
    handles: dict[int, object] = {}
    try:
        exec(solution, namespace)
    except BaseException:  # noqa: BLE001 - reported to the runner, which fails the solution
        import traceback
        channel.send(encode(("failed", traceback.format_exc()[-4000:]), None))
        return
    names = {name: value for name, value in namespace.items() if not name.startswith("__")}
    channel.send(encode(("names", names), handles))
    while True:
        try:
            request = channel.receive()
        except ProtocolError:
            return
        try:
            op, target, args = decode(request, handles.__getitem__)
            channel.send(encode(("value", OPERATIONS[op](target, *args)), handles))
        except BaseException as error:  # noqa: BLE001 - the test decides what an exception means
            channel.send(encode(("raised", type(error).__name__, str(error)[:2000]), None))


def run_tests(tests, client: Client) -> None:
    """The tests in a namespace of the solution's names, with this process's own builtins."""
    ready = client.receive()
    if type(ready) is tuple and len(ready) == 2 and ready[0] == "failed":
        raise RuntimeError(f"the solution failed to load:\n{str(ready[1])[-4000:]}")
    if not (type(ready) is tuple and len(ready) == 2 and ready[0] == "names" and type(ready[1]) is dict):
        raise ProtocolError("the solution's process did not send its names")
    namespace = {"__name__": "tests", "__builtins__": builtins}
    namespace.update({str(name): value for name, value in ready[1].items()})
    exec(tests, namespace)


def main() -> int:
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # as PID 1 with default handlers, no signal from inside lands
    try:  # compiled here, once: a first compile costs each process 1.5 ms
        with open("solution.py") as file:
            solution = compile(file.read(), "solution.py", "exec")
        with open("tests.py") as file:
            tests = compile(file.read(), "tests.py", "exec")
    except BaseException:  # noqa: BLE001 - code that does not compile fails
        import traceback
        traceback.print_exc()
        return 1
    solution_reads, runner_writes = posix.pipe()
    runner_reads, solution_writes = posix.pipe()
    child = posix.fork()
    if child == 0:  # the solution's process: of the runner's descriptors only its two pipe ends stay open
        try:
            posix.dup2(posix.open("/dev/null", posix.O_RDONLY), 0)
            posix.dup2(2, 1)
            low, high = sorted((solution_reads, solution_writes))
            for first, last in ((3, low), (low + 1, high), (high + 1, 1 << 16)):
                posix.closerange(first, last)
            sys.stdout.reconfigure(line_buffering=True)
            serve(solution, Channel(solution_reads, solution_writes))
        finally:
            posix._exit(0)
    posix.close(solution_reads)
    posix.close(solution_writes)
    marker = sys.stdin.readline().strip()
    try:
        run_tests(tests, Client(Channel(runner_reads, runner_writes)))
    except BaseException:  # noqa: BLE001 - any way out of the tests but their end is a failure
        import traceback
        traceback.print_exc()
        return 1
    finally:
        posix.kill(child, _signal.SIGKILL)
    posix.write(1, f"\n{marker}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
