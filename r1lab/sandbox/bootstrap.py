"""The trusted harness that runs inside the sandbox, before and around the untrusted program.

This file is never imported by r1lab: its source is handed to the sandboxed interpreter with
``python -I -S -c``, so everything it needs is imported inside :func:`main` and nothing here may
depend on r1lab. Its arguments come from argv (see ``_RunSetup.harness_argv`` in
:mod:`r1lab.sandbox`).

What it does, in order:

1. rlimits, then (root mode) the switch to the sandbox's own unprivileged uid;
2. reads the per-run sentinel from a pipe and closes the pipe, so that from here on the sentinel
   exists only inside a suspended generator, the *guard* (:func:`_guard`);
3. reads and compiles the program and the tests, separately, so a program cannot swallow the
   tests lexically (an unclosed ``'''``) and later edits of the files change nothing;
4. installs an audit hook (:func:`_make_audit_hook`) that refuses what would let a program reach
   into the guard or skip test lines: tracing and profiling hooks, more audit hooks, the gc's
   object graph, other threads' frames, the guard's frame, ``ctypes`` and the C-API test modules;
5. runs the program and then the tests in one ``__main__`` namespace, in a worker thread, while
   the main thread only waits and finally ``os._exit``\\ s with the program's status. No untrusted
   code ever runs in the main thread, so no Python signal handler can be installed (they run only
   there) and no atexit handler or finaliser runs at the end;
6. the tests' code ends with one appended call that resumes the guard. The guard writes the
   sentinel to the report pipe only when it is resumed from exactly that code object, run by the
   harness's own driver frame with the real builtins, with no other thread alive; anything else
   ends the process at once (a forger gets one try). Builtins are restored between the program and
   the tests, so a program's ``builtins.abs = ...`` does not reach them.

The parent counts a run as *completed* only when the report pipe holds exactly the sentinel.
Leaving early (``sys.exit``, ``os._exit``, a signal, a thread, an excepthook, an atexit handler)
never reaches the guard; a test that fails raises before it.

What this does not cover. The harness shares a process with the program, so it is as strong as
CPython's introspection barriers: the audit hook is not a general sandbox (an interpreter bug or a
way to raw memory would beat it; ``/proc/self/mem`` is closed by making the process non-dumpable,
``ctypes`` by the hook). The thread-count and builtins-identity checks are defence in depth: no
attack found needs them once the frame check is in place. And it proves only that the tests ran
to their end, not that they are strict: a function returning an object whose ``__eq__`` is always
true, or one that reads the expected values out of its caller's frame, passes ``assert f(1) == 2``
honestly -- that is the tests' to guard against.

Python 3.13 made ``frame.f_locals`` write-through; the guard's checks hold there too (they compare
identities it keeps in its own locals), but restoring builtins relies on the driver's locals, so
that one step is weaker on 3.13+.
"""

# The sentinel's guard. Everything it uses arrives as an argument: the program can rebind any
# global or builtin, but not the locals of a suspended generator (gi_frame is refused by the audit
# hook). It never calls code the program controls, never drops a reference the program gave it
# (a finaliser would run inside this frame) and turns gc off before it allocates (a gc callback
# would too).
def _guard(key_fd, report_fd, final_code, builtins_dict, marker, base_exception, read, write,
           close, getframe, gc_disable, thread_count, exit_):
    key = read(key_fd, 64)
    close(key_fd)
    try:
        sent = yield
    except base_exception:
        exit_(121)
    driver = getframe(1)  # the first resume comes from the driver, before any program code
    try:
        sent = yield
    except base_exception as exc:
        if exc is marker:  # a forked child: forget the sentinel there
            return
        exit_(121)
    gc_disable()
    try:
        if thread_count() != 1:
            exit_(121)
        caller = getframe(1)
        if (caller.f_code is not final_code or caller.f_back is not driver
                or caller.f_builtins is not builtins_dict):
            exit_(121)
        write(report_fd, key)
    except base_exception:
        exit_(121)
    yield sent


def _make_audit_hook(guard):
    # Defaults, not globals or a closure: a program can reach this module's globals through
    # frames and rewrite closure cells, but a defaults tuple is immutable and replacing it is an
    # audited event this very hook refuses.
    def audit(event, args, _guard=guard, _deny=frozenset({
            "sys.addaudithook", "sys.settrace", "sys.setprofile", "sys._current_frames",
            "sys._current_exceptions", "gc.get_objects", "gc.get_referrers", "gc.get_referents"}),
            _modules=frozenset({"ctypes", "_ctypes", "_testcapi", "_testinternalcapi",
                                "_testbuffer", "_testmultiphase", "_testimportmultiple",
                                "_xxtestfuzz"}),
            _attrs=frozenset({"__code__", "__defaults__", "__kwdefaults__"}),
            _err=RuntimeError, _str=str, _type=type):
        if event in _deny:
            raise _err(event + " is not available in the r1lab sandbox")
        if event == "import" and (_type(args[0]) is not _str or args[0] in _modules):
            raise _err("this module is not available in the r1lab sandbox")
        if event == "object.__getattr__" and args[0] is _guard:
            raise _err("the harness's frame is not available in the r1lab sandbox")
        if event == "object.__setattr__" and (_type(args[1]) is not _str or args[1] in _attrs):
            raise _err("setting this attribute is not available in the r1lab sandbox")
    return audit


def _driver(guard, namespace, program, final, builtins_mod, builtins_dict, snapshot, guard_name,
            status, done, exec_=exec):
    """Runs the stages in the worker thread; its frame is the guard's proof of who called."""
    import sys
    try:
        try:
            guard.send(None)
            namespace[guard_name] = guard
            if program is not None:
                exec_(program, namespace)
                namespace["__builtins__"] = builtins_mod
                namespace[guard_name] = guard
                # Last, so that finalisers run by clear() cannot re-patch what update() restores.
                builtins_dict.clear()
                builtins_dict.update(snapshot)
            exec_(final, namespace)
            status[0] = 0
        except SystemExit as exc:
            code = exc.code
            if code is None:
                status[0] = 0
            elif isinstance(code, int):
                status[0] = code
            else:
                print(code, file=sys.stderr)
                status[0] = 1
        except BaseException as exc:
            status[0] = 1
            tb = exc.__traceback__
            tb = tb.tb_next if tb is not None else None  # start at the program, not here
            sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
    except BaseException:
        pass  # an excepthook or stream that raises must not keep the main thread waiting
    finally:
        done.release()


def main():
    import _signal
    import _thread
    import builtins
    import gc
    import os
    import resource
    import sys

    (main_path, tests_path, key_fd, report_fd, cpu, mem, nproc, fsize, nofile, uid,
     undumpable) = sys.argv[1:12]
    cpu = int(cpu)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, nofile),
                     (resource.RLIMIT_CORE, "0")):
        resource.setrlimit(res, (int(val), int(val)))
    uid = int(uid)
    if uid >= 0:  # switching uid also makes the process non-dumpable: /proc/self/mem closes
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif undumpable == "1":
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: close /proc/self/mem
        # Out of sys.modules, so that only an import -- which the audit hook refuses -- could
        # bring it back.
        for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
            del sys.modules[name]
        del ctypes

    builtins.exit = builtins.quit = sys.exit  # -S leaves them out; programs call them
    sys.argv = [main_path]
    marker = GeneratorExit()

    def compile_file(path, suffix=b""):
        with open(path, "rb") as f:
            source = f.read()
        return compile(source + suffix, path, "exec", dont_inherit=True)

    guard_name = "__r1lab_guard__"
    epilogue = f"\n{guard_name}.send(None)\n".encode()
    try:
        if tests_path:
            program = compile_file(main_path)
            final = compile_file(tests_path, epilogue)
        else:
            program, final = None, compile_file(main_path, epilogue)
    except SyntaxError as exc:
        sys.excepthook(type(exc), exc.with_traceback(None), None)
        sys.stderr.flush()
        os._exit(1)

    guard = _guard(int(key_fd), int(report_fd), final, builtins.__dict__, marker, BaseException,
                   os.read, os.write, os.close, sys._getframe, gc.disable, _thread._count,
                   os._exit)
    next(guard)
    snapshot = tuple(builtins.__dict__.items())
    module = type(sys)("__main__")
    module.__file__ = main_path
    sys.modules["__main__"] = module

    def forget_in_child(_guard=guard, _marker=marker, _base=BaseException,
                        _isenabled=gc.isenabled, _disable=gc.disable, _enable=gc.enable):
        enabled = _isenabled()
        _disable()
        try:
            _guard.throw(_marker)
        except _base:
            pass
        if enabled:
            _enable()

    os.register_at_fork(after_in_child=forget_in_child)
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # _thread.interrupt_main() then does nothing
    sys.addaudithook(_make_audit_hook(guard))

    status = [1]
    done = _thread.allocate_lock()
    done.acquire()
    _thread.start_new_thread(_driver, (guard, module.__dict__, program, final, builtins,
                                       builtins.__dict__, snapshot, guard_name, status, done))
    while True:
        try:
            done.acquire()
            break
        except BaseException:
            continue
    gc.disable()
    code = status[0]
    os._exit((code if type(code) is int else 1) & 0xFF)


if __name__ == "__main__":
    main()
