// The emulator's runtime, built once per process into its own shared library (as C++, by g++):
// runs the blocks of a launch one after another, and the CUDA threads of a block as fibers on the
// calling OS thread. A fiber runs until it reaches a barrier or a warp operation; the last thread
// to arrive performs the exchange and releases the others, so both have their real semantics and
// the code between them runs at native speed. A barrier that can never complete is a deadlock
// report, and a signal raised inside a kernel jumps back here and becomes an error report.
#include "cuda_compat.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

enum { MAX_THREADS = 1024, STACK_BYTES = 256 * 1024 };
enum fiber_state { RUNNABLE, AT_BARRIER, AT_WARP_OP, EXITED };

// ---- context switching -------------------------------------------------------------------------
#if defined(__x86_64__) && !defined(GPUMLP_FORCE_UCONTEXT)
// Saving only the callee-saved registers and the stack pointer costs ~2 ns; swapcontext() makes a
// system call per switch (~240 ns) and stays as the fallback for other architectures.
struct fiber_context { void *stack_pointer; };

extern "C" void gpumlp_switch_stack(void **save_stack_pointer, void *load_stack_pointer);
asm(R"(
    .text
    .globl gpumlp_switch_stack
    .hidden gpumlp_switch_stack
    .type gpumlp_switch_stack, @function
gpumlp_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gpumlp_switch_stack, .-gpumlp_switch_stack
)");

static void context_switch(fiber_context *from, fiber_context *to) {
    gpumlp_switch_stack(&from->stack_pointer, to->stack_pointer);
}

static void context_prepare(fiber_context *context, char *stack, size_t size, void (*start)(void)) {
    void **top = (void **)(((uintptr_t)(stack + size)) & ~(uintptr_t)15);
    *--top = nullptr;           // `start` never returns: a null return address makes that loud
    *--top = (void *)start;     // taken by the `ret` of the first switch
    for (int saved_register = 0; saved_register < 6; ++saved_register) *--top = nullptr;
    context->stack_pointer = top;
}
#else
#include <ucontext.h>
struct fiber_context { ucontext_t context; };

static void context_switch(fiber_context *from, fiber_context *to) { swapcontext(&from->context, &to->context); }

static void context_prepare(fiber_context *context, char *stack, size_t size, void (*start)(void)) {
    getcontext(&context->context);
    context->context.uc_stack.ss_sp = stack;
    context->context.uc_stack.ss_size = size;
    context->context.uc_link = nullptr;
    makecontext(&context->context, start, 0);
}
#endif

// ---- state -------------------------------------------------------------------------------------
struct warp_op {
    int kind;
    unsigned int mask;
    unsigned long long value, result;
    unsigned int argument;
    int width;
};

struct fiber {
    fiber_context context;
    int state;
    int barrier_line;
    int barrier_reduction;
    int predicate;
    warp_op op;
    uint3 index;
};

extern "C" {
GPUMLP_EXPORT uint3 threadIdx;
GPUMLP_EXPORT uint3 blockIdx;
GPUMLP_EXPORT dim3 blockDim;
GPUMLP_EXPORT dim3 gridDim;
}

typedef void (*kernel_entry)(void *const *arguments);

static struct {
    pthread_t owner;
    fiber fibers[MAX_THREADS];
    char *stacks;
    size_t stack_stride;
    fiber_context scheduler;
    kernel_entry entry;
    void *const *arguments;
    int thread_count, reverse_order, current, exited;
    int barrier_arrived, barrier_result;
    unsigned int warp_arrived[MAX_THREADS / 32];
    int position;         // of the running fiber in the run order
    int resume_position;  // where the scan continues after a release; -1: after the running fiber
    int progressed;       // whether a fiber ran since the scan last started at position 0
    int deadlocked;
    int failed;
    char *message;
    size_t message_size;
} S;

static pthread_mutex_t launch_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *warp_op_name(int kind) {
    static const char *const names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                        "__syncwarp", "__ballot_sync", "__any_sync", "__all_sync"};
    return names[kind];
}

// ---- failing from inside a fiber ---------------------------------------------------------------
static void append(const char *format, ...) {
    size_t used = strlen(S.message);
    if (used + 1 >= S.message_size) return;
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(S.message + used, S.message_size - used, format, arguments);
    va_end(arguments);
}

static void yield_to_scheduler(void) { context_switch(&S.fibers[S.current].context, &S.scheduler); }

static void report_deadlock(void);

// The next fiber to run in run order, or -1 when every thread exited or none can run (deadlock).
static int next_runnable(void) {
    const int n = S.thread_count;
    for (;;) {
        if (S.exited == n) return -1;
        if (S.position == n) {
            if (!S.progressed) {
                report_deadlock();
                S.deadlocked = 1;
                return -1;
            }
            S.position = 0;
            S.progressed = 0;
            continue;
        }
        int tid = S.reverse_order ? n - 1 - S.position : S.position;
        if (S.fibers[tid].state == RUNNABLE) return tid;
        ++S.position;
    }
}

static void run_fiber(fiber_context *from, int tid) {
    S.current = tid;
    threadIdx = S.fibers[tid].index;
    context_switch(from, &S.fibers[tid].context);
}

// The running fiber blocked or exited: switch straight to the next runnable one (half the
// switches of going through the scheduler), or back to the scheduler when the block is over.
static void switch_away(void) {
    int self = S.current;
    S.position = S.resume_position >= 0 ? S.resume_position : S.position + 1;
    S.resume_position = -1;
    S.progressed = 1;
    int next = next_runnable();
    if (next < 0) {
        yield_to_scheduler();
    } else if (next != self) {
        run_fiber(&S.fibers[self].context, next);
    }
}

// The scheduler never resumes a fiber after this: the launch ends with S.message as its error.
[[noreturn]] static void abandon_launch(void) {
    S.failed = 1;
    yield_to_scheduler();
    __builtin_unreachable();
}

[[noreturn]] static void fail(const char *format, ...) {
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(S.message, S.message_size, format, arguments);
    va_end(arguments);
    abandon_launch();
}

// "3-7, 12" for the threads (linear ids) that satisfy `selected`; at most a few ranges.
template <class Predicate>
static void append_thread_ranges(Predicate selected) {
    int ranges = 0;
    for (int tid = 0; tid < S.thread_count; ++tid) {
        if (!selected(tid)) continue;
        int last = tid;
        while (last + 1 < S.thread_count && selected(last + 1)) ++last;
        if (ranges == 4) {
            append(", ...");
            return;
        }
        append(ranges ? ", " : "");
        append(last > tid ? "%d-%d" : "%d", tid, last);
        ++ranges;
        tid = last;
    }
}

// Lists what every unfinished thread waits for; the threads are grouped by barrier line or op.
static void append_thread_states(void) {
    int lines[8], line_count = 0, warp_kinds_seen = 0;
    for (int tid = 0; tid < S.thread_count; ++tid) {
        fiber *f = &S.fibers[tid];
        if (f->state == AT_BARRIER) {
            int known = 0;
            for (int i = 0; i < line_count; ++i) known |= lines[i] == f->barrier_line;
            if (!known && line_count < 8) lines[line_count++] = f->barrier_line;
        } else if (f->state == AT_WARP_OP) {
            warp_kinds_seen |= 1 << f->op.kind;
        }
    }
    const char *separator = "";
    for (int i = 0; i < line_count; ++i) {
        append("%sthreads ", separator);
        append_thread_ranges([&](int t) { return S.fibers[t].state == AT_BARRIER && S.fibers[t].barrier_line == lines[i]; });
        append(" wait at __syncthreads on line %d", lines[i]);
        separator = "; ";
    }
    for (int kind = 0; kind <= GPUMLP_ALL; ++kind) {
        if (!(warp_kinds_seen & (1 << kind))) continue;
        append("%sthreads ", separator);
        append_thread_ranges([&](int t) { return S.fibers[t].state == AT_WARP_OP && S.fibers[t].op.kind == kind; });
        append(" wait at %s", warp_op_name(kind));
        separator = "; ";
    }
    if (S.exited) {
        append("%sthreads ", separator);
        append_thread_ranges([](int t) { return S.fibers[t].state == EXITED; });
        append(" have exited");
    }
}

// ---- barriers ----------------------------------------------------------------------------------
static int position_of(int tid) { return S.reverse_order ? S.thread_count - 1 - tid : tid; }

static void release_barrier(void) {
    int line = S.fibers[0].barrier_line, reduction = S.fibers[0].barrier_reduction;
    int count = 0, diverged = 0;
    for (int tid = 0; tid < S.thread_count; ++tid) {
        fiber *f = &S.fibers[tid];
        diverged |= f->barrier_line != line || f->barrier_reduction != reduction;
        count += f->predicate;
    }
    if (diverged) {
        snprintf(S.message, S.message_size, "deadlock in block (%u,%u,%u): the threads wait at different barriers (",
                 blockIdx.x, blockIdx.y, blockIdx.z);
        append_thread_states();
        append("); every thread of the block must reach the same __syncthreads");
        abandon_launch();
    }
    for (int tid = 0; tid < S.thread_count; ++tid) S.fibers[tid].state = RUNNABLE;
    S.barrier_arrived = 0;
    S.barrier_result = reduction == GPUMLP_BARRIER_COUNT ? count
                     : reduction == GPUMLP_BARRIER_AND   ? count == S.thread_count
                                                         : count > 0;
    S.resume_position = 0;
}

extern "C" GPUMLP_EXPORT int gpumlp_barrier(int line, int reduction, int predicate) {
    fiber *f = &S.fibers[S.current];
    f->state = AT_BARRIER;
    f->barrier_line = line;
    f->barrier_reduction = reduction;
    f->predicate = predicate != 0;
    if (++S.barrier_arrived == S.thread_count) release_barrier();
    switch_away();
    return S.barrier_result;
}

// ---- warp operations ---------------------------------------------------------------------------
static unsigned long long shuffle(int lane, const warp_op *op, const fiber *warp, unsigned int group) {
    unsigned int width = (unsigned int)op->width, segment_start = lane & ~(width - 1), source;
    switch (op->kind) {
    case GPUMLP_SHFL_IDX: source = segment_start + (op->argument & (width - 1)); break;
    case GPUMLP_SHFL_UP: source = (lane & (width - 1)) >= op->argument ? lane - op->argument : lane; break;
    case GPUMLP_SHFL_DOWN: source = (lane & (width - 1)) + op->argument < width ? lane + op->argument : lane; break;
    default: source = (lane ^ op->argument) < segment_start + width ? lane ^ op->argument : lane; break;
    }
    // Reading a lane outside the mask is undefined in CUDA; the caller's own value is one outcome.
    return (group >> source) & 1u ? warp[source].op.value : op->value;
}

static void release_warp_op(int warp_index, unsigned int group, const warp_op *op) {
    fiber *warp = &S.fibers[warp_index * 32];
    unsigned int votes = 0;
    for (int lane = 0; lane < 32; ++lane) {
        if (!((group >> lane) & 1u)) continue;
        const warp_op *other = &warp[lane].op;
        if (other->kind != op->kind || other->mask != op->mask)
            fail("warp %d diverged: lane %d calls %s with mask 0x%08x but lane %d calls %s with mask 0x%08x",
                 warp_index, S.current % 32, warp_op_name(op->kind), op->mask, lane, warp_op_name(other->kind),
                 other->mask);
        votes |= (other->value != 0) << lane;
    }
    for (int lane = 0; lane < 32; ++lane) {
        if (!((group >> lane) & 1u)) continue;
        warp_op *own = &warp[lane].op;
        switch (op->kind) {
        case GPUMLP_SYNCWARP: own->result = 0; break;
        case GPUMLP_BALLOT: own->result = votes; break;
        case GPUMLP_ANY: own->result = votes != 0; break;
        case GPUMLP_ALL: own->result = votes == group; break;
        default: own->result = shuffle(lane, own, warp, group); break;
        }
    }
    int first = -1;
    for (int lane = 0; lane < 32; ++lane) {
        if (!((group >> lane) & 1u)) continue;
        warp[lane].state = RUNNABLE;
        int position = position_of(warp_index * 32 + lane);
        if (first < 0 || position < first) first = position;
    }
    S.warp_arrived[warp_index] &= ~group;
    S.resume_position = first;
}

extern "C" GPUMLP_EXPORT unsigned long long gpumlp_warp_op(int kind, unsigned int mask, unsigned long long value,
                                                           unsigned int argument, int width) {
    int tid = S.current, warp_index = tid / 32, lane = tid % 32;
    if (!((mask >> lane) & 1u))
        fail("lane %d of warp %d calls %s with mask 0x%08x, which does not include the lane itself", lane,
             warp_index, warp_op_name(kind), mask);
    if (width < 1 || width > 32 || (width & (width - 1)))
        fail("%s with width %d: the width must be a power of two from 1 to 32", warp_op_name(kind), width);
    int lanes_in_warp = S.thread_count - warp_index * 32 < 32 ? S.thread_count - warp_index * 32 : 32;
    unsigned int existing = lanes_in_warp == 32 ? 0xffffffffu : (1u << lanes_in_warp) - 1u;
    unsigned int group = mask & existing;
    fiber *f = &S.fibers[tid];
    f->op = warp_op{kind, mask, value, 0, argument, width};
    f->state = AT_WARP_OP;
    S.warp_arrived[warp_index] |= 1u << lane;
    if ((S.warp_arrived[warp_index] & group) == group) release_warp_op(warp_index, group, &f->op);
    switch_away();
    return f->op.result;
}

// ---- running a block ---------------------------------------------------------------------------
static void fiber_main(void) {
    S.entry(S.arguments);
    S.fibers[S.current].state = EXITED;
    ++S.exited;
    switch_away();
    __builtin_unreachable();
}

static void report_deadlock(void) {
    snprintf(S.message, S.message_size, "deadlock in block (%u,%u,%u): ", blockIdx.x, blockIdx.y, blockIdx.z);
    append_thread_states();
    append("; a barrier or warp operation waits for threads that never reach it");
}

// Runs the fibers of the block in thread order (or reversed) until all exit; 0 when they did.
static int run_block(void) {
    for (int tid = 0; tid < S.thread_count; ++tid) {
        fiber *f = &S.fibers[tid];
        context_prepare(&f->context, S.stacks + tid * S.stack_stride + S.stack_stride - STACK_BYTES, STACK_BYTES,
                        fiber_main);
        f->state = RUNNABLE;
        f->index = uint3{tid % blockDim.x, tid / blockDim.x % blockDim.y, tid / (blockDim.x * blockDim.y)};
    }
    S.exited = S.barrier_arrived = S.deadlocked = S.progressed = S.position = 0;
    S.resume_position = -1;
    memset(S.warp_arrived, 0, sizeof S.warp_arrived);
    run_fiber(&S.scheduler, next_runnable());
    return S.failed || S.deadlocked;
}

// ---- crash containment -------------------------------------------------------------------------
static const int crash_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
enum { CRASH_SIGNAL_COUNT = sizeof crash_signals / sizeof crash_signals[0] };
static struct sigaction previous_actions[CRASH_SIGNAL_COUNT];
static sigjmp_buf crash_jump;
static volatile sig_atomic_t crash_armed, crash_signal, passed_on;
static void *volatile crash_address;

static void on_crash(int signal_number, siginfo_t *info, void *) {
    if (!crash_armed || !pthread_equal(pthread_self(), S.owner)) {
        // Not a kernel's: give it to whoever handled it before. A fault recurs on return; a signal
        // sent by kill() or raise() must be sent again. Coming back here means that handler chained
        // to us in turn (faulthandler does): then the default action ends it.
        if (passed_on) {
            signal(signal_number, SIG_DFL);
        } else {
            passed_on = 1;
            for (int i = 0; i < CRASH_SIGNAL_COUNT; ++i)
                if (crash_signals[i] == signal_number) sigaction(signal_number, &previous_actions[i], nullptr);
        }
        if (info->si_code <= 0) raise(signal_number);
        return;
    }
    crash_armed = 0;
    crash_signal = signal_number;
    crash_address = info->si_addr;
    siglongjmp(crash_jump, 1);
}

// The handlers stay installed between launches (a launch then costs one system call for this, not
// ten); they are put back if someone replaced them, as Python's faulthandler.enable() does.
static void ensure_crash_handlers(void) {
    struct sigaction current;
    sigaction(SIGSEGV, nullptr, &current);
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_crash) return;
    struct sigaction action = {};
    action.sa_sigaction = on_crash;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    passed_on = 0;
    for (int i = 0; i < CRASH_SIGNAL_COUNT; ++i) sigaction(crash_signals[i], &action, &previous_actions[i]);
}

static void ensure_alternate_signal_stack(void) {
    // A fiber that overflows its stack faults on the guard page: the handler needs another stack.
    static thread_local int ready;
    if (ready) return;
    ready = 1;
    stack_t current;
    if (sigaltstack(nullptr, &current) == 0 && !(current.ss_flags & SS_DISABLE)) return;
    stack_t ours = {};
    ours.ss_size = 64 * 1024;
    ours.ss_sp = malloc(ours.ss_size);
    sigaltstack(&ours, nullptr);
}

static void report_crash(void) {
    const char *what = crash_signal == SIGSEGV ? "SIGSEGV (invalid memory access)"
                     : crash_signal == SIGBUS  ? "SIGBUS (misaligned or unmapped memory access)"
                     : crash_signal == SIGFPE  ? "SIGFPE (integer division by zero?)"
                     : crash_signal == SIGILL  ? "SIGILL (__trap or illegal instruction)"
                                               : "SIGABRT (assert failed or abort called)";
    const fiber *f = &S.fibers[S.current];
    snprintf(S.message, S.message_size, "crashed with %s at address %p in block (%u,%u,%u), thread (%u,%u,%u)", what,
             crash_address, blockIdx.x, blockIdx.y, blockIdx.z, f->index.x, f->index.y, f->index.z);
    uintptr_t offset = (uintptr_t)crash_address - (uintptr_t)S.stacks;
    if (crash_signal == SIGSEGV && offset < MAX_THREADS * S.stack_stride &&
        offset % S.stack_stride < S.stack_stride - STACK_BYTES)
        append(": the thread overflowed its %d KiB stack (large local arrays or deep recursion?)", STACK_BYTES / 1024);
    sigset_t crashes;
    sigemptyset(&crashes);
    for (int i = 0; i < CRASH_SIGNAL_COUNT; ++i) sigaddset(&crashes, crash_signals[i]);
    pthread_sigmask(SIG_UNBLOCK, &crashes, nullptr);
}

// ---- launching ---------------------------------------------------------------------------------
static int allocate_stacks(void) {
    if (S.stacks) return 0;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    S.stack_stride = STACK_BYTES + page;
    char *stacks = (char *)mmap(nullptr, MAX_THREADS * S.stack_stride, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stacks == MAP_FAILED) return 1;
    for (int tid = 0; tid < MAX_THREADS; ++tid) mprotect(stacks + tid * S.stack_stride, page, PROT_NONE);
    S.stacks = stacks;
    return 0;
}

static void run_grid(const unsigned int grid[3], const gpumlp_module_memory *memory, size_t shared_bytes,
                     int poison_shared) {
    for (unsigned int z = 0; z < grid[2]; ++z)
        for (unsigned int y = 0; y < grid[1]; ++y)
            for (unsigned int x = 0; x < grid[0]; ++x) {
                blockIdx = uint3{x, y, z};
                if (poison_shared) {
                    // 0xFF bytes are a NaN in every float and double: reading before writing shows.
                    memset(memory->static_begin, 0xff, memory->static_end - memory->static_begin);
                    memset(memory->dynamic, 0xff, shared_bytes);
                }
                if (run_block()) return;
            }
}

// Returns 0, or 1 with the reason in `message`. `dimensions` is the grid then the block (x, y, z);
// `slots` holds one 8-byte slot per kernel argument: an array's data pointer or a scalar's bytes.
extern "C" GPUMLP_EXPORT int gpumlp_launch(kernel_entry entry, const unsigned int dimensions[6], size_t shared_bytes, const gpumlp_module_memory *memory, int flags,
                                           unsigned long long *slots, int argument_count, char *message,
                                           size_t message_size) {
    enum { POISON_SHARED = 1, REVERSE_THREADS = 2 };
    const unsigned int *grid = dimensions, *block = dimensions + 3;
    pthread_mutex_lock(&launch_lock);
    S.message = message;
    S.message_size = message_size;
    message[0] = 0;
    S.failed = 0;
    unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (threads == 0 || threads > MAX_THREADS || grid[0] == 0 || grid[1] == 0 || grid[2] == 0) {
        snprintf(message, message_size, "invalid launch: grid (%u,%u,%u), block (%u,%u,%u); a block has 1 to %d threads",
                 grid[0], grid[1], grid[2], block[0], block[1], block[2], MAX_THREADS);
        pthread_mutex_unlock(&launch_lock);
        return 1;
    }
    if (shared_bytes > memory->dynamic_capacity || allocate_stacks()) {
        snprintf(message, message_size, shared_bytes > memory->dynamic_capacity
                 ? "invalid launch: %zu bytes of dynamic shared memory, more than the %zu a block can have"
                 : "could not allocate the fiber stacks (%zu, %zu)", shared_bytes, memory->dynamic_capacity);
        pthread_mutex_unlock(&launch_lock);
        return 1;
    }
    void *arguments[argument_count > 0 ? argument_count : 1];
    for (int i = 0; i < argument_count; ++i) arguments[i] = &slots[i];
    S.owner = pthread_self();
    S.entry = entry;
    S.arguments = arguments;
    S.thread_count = (int)threads;
    S.reverse_order = (flags & REVERSE_THREADS) != 0;
    blockDim = dim3(block[0], block[1], block[2]);
    gridDim = dim3(grid[0], grid[1], grid[2]);
    ensure_alternate_signal_stack();
    ensure_crash_handlers();
    if (sigsetjmp(crash_jump, 0)) {
        report_crash();
        pthread_mutex_unlock(&launch_lock);
        return 1;
    }
    crash_armed = 1;
    run_grid(grid, memory, shared_bytes, flags & POISON_SHARED);
    crash_armed = 0;
    int failed = S.failed || message[0] != 0;
    pthread_mutex_unlock(&launch_lock);
    return failed;
}
