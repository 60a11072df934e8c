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
enum fiber_state { RUNNABLE, AT_BARRIER, AT_WARP_OP, EXITED, AT_GRID_BARRIER };

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

// A cooperative launch (gpumlp_launch_cooperative, at the end of this file): every block's fibers
// live at once. The running block runs until each of its threads waits at the grid barrier or has
// exited, then the next block runs; when every block waits, all are released.
static struct {
    int active;           // the launch in progress is cooperative
    int parked;           // threads of the running block waiting at the grid barrier
} C;

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
        if (S.exited + C.parked == n) return -1;
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
    if (C.parked) {
        append("%sthreads ", separator);
        append_thread_ranges([](int t) { return S.fibers[t].state == AT_GRID_BARRIER; });
        append(" wait at this_grid().sync()");
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

static int run_grid_cooperatively(const unsigned int grid[3], const gpumlp_module_memory *memory,
                                  size_t shared_bytes, int poison_shared);

static void run_grid(const unsigned int grid[3], const gpumlp_module_memory *memory, size_t shared_bytes,
                     int poison_shared) {
    if (run_grid_cooperatively(grid, memory, shared_bytes, poison_shared)) return;
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

// ---- cooperative launches ----------------------------------------------------------------------
// Between two grid barriers the blocks run one after another, each until all of its threads wait
// at the barrier (or exited): a schedule a GPU may also choose, so a kernel that reads what another
// block writes without a grid barrier in between reads stale or poisoned memory here. The block
// order of each such phase is the launch order, reversed, or a seeded shuffle drawn anew for every
// phase. Each block keeps its own fibers, stacks and a saved copy of its shared memory, which is
// swapped in while it runs. Only the x86-64 context switch is used: a copied ucontext_t keeps a
// pointer into its old location.
enum { COOPERATIVE_LAUNCH_ORDER, COOPERATIVE_REVERSED, COOPERATIVE_SHUFFLED };
// Each stack's guard page is a mapping of its own: Linux allows ~65k mappings per process.
enum { MAX_COOPERATIVE_THREADS = 16 * 1024 };

static thread_local struct {
    int requested, order;
    unsigned long long seed;
} cooperative_request;

static struct {
    char *stacks;               // MAX_COOPERATIVE_THREADS stacks with guard pages, mapped once
    fiber *fibers;              // (blocks, threads) saved fibers
    char *shared;               // (blocks, shared bytes) saved shared memory
    int *exited, *order;        // per block: exited threads; the run order of the phase
    size_t capacity_blocks, capacity_shared;
} CS;

extern "C" GPUMLP_EXPORT void gpumlp_grid_sync(int line) {
    if (!C.active)
        fail("this_grid().sync() on line %d in a launch that is not cooperative: launch the kernel with "
             "launch_cooperative (on a GPU, cudaLaunchCooperativeKernel)", line);
    fiber *f = &S.fibers[S.current];
    f->state = AT_GRID_BARRIER;
    f->barrier_line = line;
    ++C.parked;
    switch_away();
}

static int allocate_cooperative(size_t blocks, size_t threads, size_t shared) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE), stride = STACK_BYTES + page;
    if (!CS.stacks) {
        char *stacks = (char *)mmap(nullptr, MAX_COOPERATIVE_THREADS * stride, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (stacks == MAP_FAILED) return 1;
        for (int t = 0; t < MAX_COOPERATIVE_THREADS; ++t) mprotect(stacks + t * stride, page, PROT_NONE);
        CS.stacks = stacks;
    }
    (void)threads;  // the saved fibers are allocated for full blocks of MAX_THREADS
    if (blocks > CS.capacity_blocks || shared > CS.capacity_shared) {
        size_t capacity = blocks > CS.capacity_blocks ? blocks : CS.capacity_blocks;
        size_t shared_capacity = shared > CS.capacity_shared ? shared : CS.capacity_shared;
        free(CS.fibers), free(CS.shared), free(CS.exited), free(CS.order);
        CS.fibers = (fiber *)calloc(capacity * MAX_THREADS, sizeof(fiber));
        CS.shared = (char *)malloc(capacity * (shared_capacity ? shared_capacity : 1));
        CS.exited = (int *)calloc(capacity, sizeof(int));
        CS.order = (int *)calloc(capacity, sizeof(int));
        CS.capacity_blocks = capacity;
        CS.capacity_shared = shared_capacity;
        if (!CS.fibers || !CS.shared || !CS.exited || !CS.order) {
            CS.capacity_blocks = CS.capacity_shared = 0;
            return 1;
        }
    }
    return 0;
}

static unsigned long long splitmix64(unsigned long long *state) {
    unsigned long long z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void phase_order(int blocks, unsigned long long *random_state) {
    for (int i = 0; i < blocks; ++i)
        CS.order[i] = cooperative_request.order == COOPERATIVE_REVERSED ? blocks - 1 - i : i;
    if (cooperative_request.order == COOPERATIVE_SHUFFLED)
        for (int i = blocks - 1; i > 0; --i) {
            int j = (int)(splitmix64(random_state) % (unsigned long long)(i + 1)), swap = CS.order[i];
            CS.order[i] = CS.order[j];
            CS.order[j] = swap;
        }
}

// "0-3, 7" for the blocks that satisfy `selected`.
template <class Predicate>
static void append_block_ranges(int blocks, Predicate selected) {
    const char *separator = "";
    for (int b = 0; b < blocks; ++b) {
        if (!selected(b)) continue;
        int last = b;
        while (last + 1 < blocks && selected(last + 1)) ++last;
        append(last > b ? "%s%d-%d" : "%s%d", separator, b, last);
        separator = ", ";
        b = last;
    }
}

// After a phase every block's threads wait at the grid barrier or have exited. Returns 1 when all
// of them wait at the same barrier (then they are released), 0 when every thread exited, and fails
// the launch otherwise.
static int release_grid_barrier(int blocks, int threads) {
    int waiting = 0, line = -1, mixed_lines = 0;
    for (int b = 0; b < blocks; ++b)
        for (int t = 0; t < threads; ++t) {
            const fiber *f = &CS.fibers[(size_t)b * threads + t];
            if (f->state != AT_GRID_BARRIER) continue;
            mixed_lines |= waiting && f->barrier_line != line;
            line = f->barrier_line;
            ++waiting;
        }
    if (waiting == 0) return 0;
    if (waiting != blocks * threads || mixed_lines) {
        snprintf(S.message, S.message_size, "deadlock at the grid barrier (this_grid().sync() on line %d): blocks ", line);
        append_block_ranges(blocks, [&](int b) { return CS.exited[b] < threads; });
        append(" wait");
        if (waiting != blocks * threads) {
            append(" but threads of blocks ");
            append_block_ranges(blocks, [&](int b) { return CS.exited[b] > 0; });
            append(" have exited");
        } else {
            append(" at different grid barriers");
        }
        append("; every thread of the grid must reach the same grid barrier");
        S.failed = 1;
        return 0;
    }
    for (size_t i = 0; i < (size_t)blocks * threads; ++i) CS.fibers[i].state = RUNNABLE;
    return 1;
}

// Runs the grid when the launch is cooperative and returns 1; returns 0 for an ordinary launch.
static int run_grid_cooperatively(const unsigned int grid[3], const gpumlp_module_memory *memory,
                                  size_t shared_bytes, int poison_shared) {
    C.active = C.parked = 0;
    if (!cooperative_request.requested) return 0;
    const int threads = S.thread_count;
    const unsigned long long block_count = (unsigned long long)grid[0] * grid[1] * grid[2];
    const size_t static_bytes = (size_t)(memory->static_end - memory->static_begin);
    const size_t shared_total = static_bytes + shared_bytes;
#if !defined(__x86_64__) || defined(GPUMLP_FORCE_UCONTEXT)
    snprintf(S.message, S.message_size, "cooperative launches need the emulator's x86-64 context switch");
    S.failed = 1;
    return 1;
#endif
    if (block_count * threads > MAX_COOPERATIVE_THREADS) {
        snprintf(S.message, S.message_size, "cooperative launch of %llu blocks of %d threads: the emulator runs "
                 "at most %d threads of a cooperative launch at once", block_count, threads, MAX_COOPERATIVE_THREADS);
        S.failed = 1;
        return 1;
    }
    const int blocks = (int)block_count;
    if (allocate_cooperative(blocks, threads, shared_total)) {
        snprintf(S.message, S.message_size, "could not allocate the fibers of a cooperative launch");
        S.failed = 1;
        return 1;
    }
    const size_t stride = STACK_BYTES + (size_t)sysconf(_SC_PAGESIZE);
    for (int b = 0; b < blocks; ++b) {
        for (int t = 0; t < threads; ++t) {
            fiber *f = &CS.fibers[(size_t)b * threads + t];
            char *stack = CS.stacks + ((size_t)b * threads + t) * stride;
            context_prepare(&f->context, stack + stride - STACK_BYTES, STACK_BYTES, fiber_main);
            f->state = RUNNABLE;
            f->index = uint3{t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
        }
        CS.exited[b] = 0;
        // 0xFF bytes are a NaN in every float and double: reading before writing shows.
        memset(CS.shared + (size_t)b * shared_total, poison_shared ? 0xff : 0, shared_total);
    }
    C.active = 1;
    unsigned long long random_state = cooperative_request.seed;
    do {
        phase_order(blocks, &random_state);
        for (int i = 0; i < blocks; ++i) {
            const int b = CS.order[i];
            if (CS.exited[b] == threads) continue;
            fiber *saved = &CS.fibers[(size_t)b * threads];
            char *saved_shared = CS.shared + (size_t)b * shared_total;
            memcpy(S.fibers, saved, threads * sizeof(fiber));
            memcpy(memory->static_begin, saved_shared, static_bytes);
            memcpy(memory->dynamic, saved_shared + static_bytes, shared_bytes);
            blockIdx = uint3{(unsigned)b % grid[0], (unsigned)b / grid[0] % grid[1], (unsigned)b / (grid[0] * grid[1])};
            S.exited = CS.exited[b];
            C.parked = S.barrier_arrived = S.deadlocked = S.progressed = S.position = 0;
            S.resume_position = -1;
            memset(S.warp_arrived, 0, sizeof S.warp_arrived);
            run_fiber(&S.scheduler, next_runnable());
            if (S.failed || S.deadlocked) return 1;
            memcpy(saved, S.fibers, threads * sizeof(fiber));
            memcpy(saved_shared, memory->static_begin, static_bytes);
            memcpy(saved_shared + static_bytes, memory->dynamic, shared_bytes);
            CS.exited[b] = S.exited;
        }
    } while (release_grid_barrier(blocks, threads));
    C.active = C.parked = 0;
    return 1;
}

// gpumlp_launch with every block resident at once and this_grid().sync() as a grid-wide barrier.
// `order`: 0 launch order, 1 reversed, 2 shuffled anew each phase from `seed`.
extern "C" GPUMLP_EXPORT int gpumlp_launch_cooperative(kernel_entry entry, const unsigned int dimensions[6],
                                                       size_t shared_bytes, const gpumlp_module_memory *memory,
                                                       int flags, int order, unsigned long long seed,
                                                       unsigned long long *slots, int argument_count,
                                                       char *message, size_t message_size) {
    cooperative_request.requested = 1;
    cooperative_request.order = order;
    cooperative_request.seed = seed;
    int failed = gpumlp_launch(entry, dimensions, shared_bytes, memory, flags, slots, argument_count, message,
                               message_size);
    cooperative_request.requested = 0;
    return failed;
}
