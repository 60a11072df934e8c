// The emulator's runtime, built once per process into its own shared library (as C++, by g++):
// runs the blocks of a launch one after another, and the CUDA threads of a block as fibers on the
// calling OS thread. A fiber runs until it reaches a barrier or a warp operation; the last thread
// to arrive performs the exchange and releases the others, so both have their real semantics and
// the code between them runs at native speed. A barrier that can never complete is a deadlock
// report, and a signal raised inside a kernel jumps back here and becomes an error report.
//
// The checks a launch may ask for (flags of gpumlp_launch): shared memory poisoned with NaN bytes,
// threads run last to first, blocks run in launch order, reversed or in a seeded random order,
// subnormal floats flushed to zero as CuPy's -ftz=true compiles them, and memcheck: every array
// argument is copied between guard pages for the launch, so an access past either end faults and
// is reported with the argument and the element index; the pages past the launch's dynamic shared
// memory are guarded too (their sub-page tail by a fill pattern checked after each block). A
// cooperative launch (flag COOPERATIVE) keeps every block resident, with this_grid().sync() as a
// grid-wide barrier and barrier_arrive / barrier_wait as a split one, of which the flag
// SPLIT_AT_WAIT makes the wait the real barrier.
#include "cuda_compat.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

enum { MAX_THREADS = 1024, STACK_BYTES = 256 * 1024 };
enum fiber_state { RUNNABLE, AT_BARRIER, AT_WARP_OP, EXITED, AT_GRID_BARRIER };
// Which barrier a fiber waits at: the reductions of gpumlp_barrier (all __syncthreads), then the
// scheduler's own. CUDA's barrier_arrive and barrier_wait each include a __syncthreads of the block
// (cooperative_groups/details/sync.h: sync_grids_arrive, sync_grids_wait); the half that is not the
// grid barrier keeps that block barrier.
enum barrier_kind {
    BLOCK_OF_ARRIVE = GPUMLP_BARRIER_OR + 1, BLOCK_OF_WAIT,
    GRID_SYNC, GRID_ARRIVE, GRID_WAIT
};

static const char *barrier_name(int kind) {
    switch (kind) {
    case BLOCK_OF_ARRIVE: case GRID_ARRIVE: return "barrier_arrive";
    case BLOCK_OF_WAIT: case GRID_WAIT: return "barrier_wait";
    case GRID_SYNC: return "this_grid().sync()";
    default: return "__syncthreads";
    }
}

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
    int barrier_kind;          // enum barrier_kind
    int predicate;
    int pending_arrive_line;   // of the thread's barrier_arrive that awaits its barrier_wait; 0: none
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


// A cooperative launch (the COOPERATIVE flag of gpumlp_launch; run_grid_cooperatively, at the end of
// this file): every block's fibers live at once. The running block runs until each of its threads
// waits at the grid barrier or has exited, then the next block runs; when every block waits, all
// are released.
static struct {
    int requested;        // the launch in progress is cooperative
    int active;           // its blocks are running (this_grid().sync() is allowed)
    int parked;           // threads of the running block waiting at the grid barrier
    int split_at_wait;    // barrier_wait, not barrier_arrive, is the grid barrier of the pair
    unsigned long long grid_barriers;   // grid barriers the launch has passed (gpumlp_grid_barriers)
} C;

// The grid barriers the last cooperative launch passed: every block released from one counts once.
extern "C" GPUMLP_EXPORT unsigned long long gpumlp_grid_barriers(void) { return C.grid_barriers; }

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

// Lists what every unfinished thread waits for; the threads are grouped by barrier and line, or op.
static void append_thread_states(void) {
    struct barrier_group { int state; const char *name; int line; } groups[8];
    int group_count = 0, warp_kinds_seen = 0;
    auto in_group = [](const fiber *f, const barrier_group &g) {
        return f->state == g.state && !strcmp(barrier_name(f->barrier_kind), g.name) && f->barrier_line == g.line;
    };
    for (int tid = 0; tid < S.thread_count; ++tid) {
        fiber *f = &S.fibers[tid];
        if (f->state == AT_BARRIER || f->state == AT_GRID_BARRIER) {
            int known = 0;
            for (int i = 0; i < group_count; ++i) known |= in_group(f, groups[i]);
            if (!known && group_count < 8)
                groups[group_count++] = {f->state, barrier_name(f->barrier_kind), f->barrier_line};
        } else if (f->state == AT_WARP_OP) {
            warp_kinds_seen |= 1 << f->op.kind;
        }
    }
    const char *separator = "";
    for (int i = 0; i < group_count; ++i) {
        if (groups[i].state != AT_BARRIER) continue;
        append("%sthreads ", separator);
        append_thread_ranges([&](int t) { return in_group(&S.fibers[t], groups[i]); });
        append(" wait at %s on line %d", groups[i].name, groups[i].line);
        separator = "; ";
    }
    for (int kind = 0; kind <= GPUMLP_ALL; ++kind) {
        if (!(warp_kinds_seen & (1 << kind))) continue;
        append("%sthreads ", separator);
        append_thread_ranges([&](int t) { return S.fibers[t].state == AT_WARP_OP && S.fibers[t].op.kind == kind; });
        append(" wait at %s", warp_op_name(kind));
        separator = "; ";
    }
    for (int i = 0; i < group_count; ++i) {
        if (groups[i].state != AT_GRID_BARRIER) continue;
        append("%sthreads ", separator);
        append_thread_ranges([&](int t) { return in_group(&S.fibers[t], groups[i]); });
        append(" wait at %s on line %d", groups[i].name, groups[i].line);
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
    int line = S.fibers[0].barrier_line, reduction = S.fibers[0].barrier_kind;
    int count = 0, diverged = 0;
    for (int tid = 0; tid < S.thread_count; ++tid) {
        fiber *f = &S.fibers[tid];
        diverged |= f->barrier_line != line || f->barrier_kind != reduction;
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
    f->barrier_kind = reduction;
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
[[noreturn]] static void fail_split_barrier(const char *call, int line);

static void fiber_main(void) {
    S.entry(S.arguments);
    if (S.fibers[S.current].pending_arrive_line) fail_split_barrier("exits", 0);
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
        f->pending_arrive_line = 0;
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
static volatile sig_atomic_t crash_write;  // the faulting access: 1 a write, 0 a read, -1 not known
static void *volatile crash_address;

static void on_crash(int signal_number, siginfo_t *info, void *context) {
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
#if defined(__x86_64__) && defined(REG_ERR)
    crash_write = (((ucontext_t *)context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;  // the page fault's W bit
#else
    (void)context;
    crash_write = -1;
#endif
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

// ---- memcheck: array arguments between guard pages ---------------------------------------------
// What Python says about each argument: its size in bytes (NOT_A_BUFFER for a scalar), the size of
// one element, whether numpy lets it be written, and how a report names it ("'W' (float*)").
struct gpumlp_argument_extent {
    unsigned long long bytes, element_size, writeable;
    const char *description;
};
static const unsigned long long NOT_A_BUFFER = ~0ull;
enum { MAX_ARGUMENTS = 64, LEADING_GUARD_PAGES = 16, TRAILING_GUARD_PAGES = 256, CANARY = 0xA5 };

// A guarded region: [leading guard][data pages][trailing guard], the data ending exactly at the end
// of the data pages, so the first byte past them faults. The bytes between the start of the data
// pages and the data (less than a page) hold a canary, checked after each launch: a write just
// before the array is found there, a read there is not (it reads the canary).
struct guarded_region {
    char *mapping;
    size_t mapped_bytes, data_pages;
    char *data;
    size_t bytes;
};

// Maps `r` for `bytes` (keeping its mapping when the page count matches) and lays down the canary.
static int map_region(guarded_region *r, size_t bytes) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE), pages = (bytes + page - 1) / page;
    if (!r->mapping || r->data_pages != pages) {
        if (r->mapping) munmap(r->mapping, r->mapped_bytes);
        r->mapping = nullptr;
        size_t total = (LEADING_GUARD_PAGES + pages + TRAILING_GUARD_PAGES) * page;
        char *mapping = (char *)mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mapping == MAP_FAILED) return 1;
        if (pages && mprotect(mapping + LEADING_GUARD_PAGES * page, pages * page, PROT_READ | PROT_WRITE)) {
            munmap(mapping, total);
            return 1;
        }
        r->mapping = mapping;
        r->mapped_bytes = total;
        r->data_pages = pages;
    }
    char *data_pages = r->mapping + LEADING_GUARD_PAGES * page;
    r->bytes = bytes;
    r->data = data_pages + pages * page - bytes;
    memset(data_pages, CANARY, r->data - data_pages);
    return 0;
}

// Arrays that EmulatedDevice allocates live in guarded regions from the start (gpumlp_guarded_*),
// so memcheck checks them in place instead of copying them; the list is guarded by launch_lock.
static guarded_region *allocations;
static int allocation_count, allocation_capacity;
static pthread_mutex_t launch_lock = PTHREAD_MUTEX_INITIALIZER;

extern "C" GPUMLP_EXPORT void *gpumlp_guarded_allocate(size_t bytes) {
    pthread_mutex_lock(&launch_lock);
    void *data = nullptr;
    if (allocation_count == allocation_capacity) {
        int capacity = allocation_capacity ? 2 * allocation_capacity : 64;
        void *grown = realloc(allocations, capacity * sizeof *allocations);
        if (grown) {
            allocations = (guarded_region *)grown;
            allocation_capacity = capacity;
        }
    }
    if (allocation_count < allocation_capacity) {
        guarded_region region = {};
        if (!map_region(&region, bytes)) {
            allocations[allocation_count++] = region;
            data = region.data;
        }
    }
    pthread_mutex_unlock(&launch_lock);
    return data;
}

extern "C" GPUMLP_EXPORT void gpumlp_guarded_free(void *data) {
    pthread_mutex_lock(&launch_lock);
    for (int i = 0; i < allocation_count; ++i) {
        if (allocations[i].data != data) continue;
        munmap(allocations[i].mapping, allocations[i].mapped_bytes);
        allocations[i] = allocations[--allocation_count];
        break;
    }
    pthread_mutex_unlock(&launch_lock);
}

static const guarded_region *allocation_holding(uintptr_t begin, uintptr_t end) {
    for (int i = 0; i < allocation_count; ++i) {
        uintptr_t data = (uintptr_t)allocations[i].data;
        if (begin >= data && end <= data + allocations[i].bytes) return &allocations[i];
    }
    return nullptr;
}

// Whether [begin, begin + bytes) lies in one guarded allocation (which memcheck guards wherever the
// kernel finds its address).
extern "C" GPUMLP_EXPORT int gpumlp_guarded_holds(const void *begin, size_t bytes) {
    pthread_mutex_lock(&launch_lock);
    int held = allocation_holding((uintptr_t)begin, (uintptr_t)begin + bytes) != nullptr;
    pthread_mutex_unlock(&launch_lock);
    return held;
}

// The arguments whose bytes overlap (one array passed twice, or views of one) form one group: a
// guarded copy of their union for the launch, or the guarded allocation that holds them.
struct guarded_copy {
    guarded_region own;            // the copy's region, kept for the next launch (training relaunches one shape)
    const guarded_region *region;  // this launch: &own, or the allocation that holds the arguments
    uintptr_t original;            // this launch: the caller's array (the union of the group)
    size_t bytes;
    int argument;                  // the argument that names the group in a report
    int writeable;                 // all its arguments are writeable arrays: a copy is copied back
};

static struct {
    guarded_copy copies[MAX_ARGUMENTS];
    int copy_count;
    int copy_of[MAX_ARGUMENTS];   // per argument: its group, -1 for a scalar
    uintptr_t begin[MAX_ARGUMENTS];
    const gpumlp_argument_extent *extents;
    int argument_count;
    size_t page;
} M;

static int prepare_group(guarded_copy *g) {
    g->region = allocation_holding(g->original, g->original + g->bytes);
    if (g->region) return 0;
    if (map_region(&g->own, g->bytes)) return 1;
    memcpy(g->own.data, (const void *)g->original, g->bytes);
    g->region = &g->own;
    return 0;
}

// Where an argument's bytes are during the launch.
static uintptr_t launch_address(const guarded_copy *g, uintptr_t begin) {
    return g->region == &g->own ? (uintptr_t)g->own.data + (begin - g->original) : begin;
}

// Replaces each array argument's slot by its guarded copy; arguments whose bytes overlap (one
// array passed twice, or views of one) share a copy, so they still alias. 0, or 1 with a message.
static int memcheck_prepare(unsigned long long *slots, const gpumlp_argument_extent *extents, int count) {
    M.page = (size_t)sysconf(_SC_PAGESIZE);
    M.extents = extents;
    M.argument_count = count;
    M.copy_count = 0;
    int order[MAX_ARGUMENTS], buffers = 0;
    for (int i = 0; i < count; ++i) {
        M.copy_of[i] = -1;
        if (extents[i].bytes == NOT_A_BUFFER) continue;
        M.begin[i] = (uintptr_t)slots[i];
        int at = buffers++;  // insertion sort by start address
        while (at > 0 && M.begin[order[at - 1]] > M.begin[i]) {
            order[at] = order[at - 1];
            --at;
        }
        order[at] = i;
    }
    for (int k = 0; k < buffers; ++k) {
        int i = order[k];
        uintptr_t begin = M.begin[i], end = begin + extents[i].bytes;
        guarded_copy *last = M.copy_count ? &M.copies[M.copy_count - 1] : nullptr;
        if (last && (begin < last->original + last->bytes || begin == last->original)) {
            if (end > last->original + last->bytes) last->bytes = end - last->original;
            last->writeable &= extents[i].writeable != 0;
        } else {
            last = &M.copies[M.copy_count++];
            last->original = begin;
            last->bytes = end - begin;
            last->argument = i;
            last->writeable = extents[i].writeable != 0;
        }
        M.copy_of[i] = (int)(last - M.copies);
    }
    for (int c = 0; c < M.copy_count; ++c) {
        if (prepare_group(&M.copies[c])) {
            snprintf(S.message, S.message_size, "memcheck could not map a guarded copy of %zu bytes",
                     M.copies[c].bytes);
            M.copy_count = c;
            return 1;
        }
    }
    for (int i = 0; i < count; ++i)
        if (M.copy_of[i] >= 0) slots[i] = launch_address(&M.copies[M.copy_of[i]], M.begin[i]);
    return 0;
}

static long long floor_divide(long long a, long long b) { return a / b - (a % b != 0 && (a < 0) != (b < 0)); }

static void append_out_of_bounds(const char *access, int argument, long long offset) {
    const gpumlp_argument_extent *extent = &M.extents[argument];
    long long element = (long long)(extent->element_size ? extent->element_size : 1);
    append("out-of-bounds %s of argument %s at index %lld: it has %llu elements (memcheck)", access,
           extent->description, floor_divide(offset, element), extent->bytes / element);
}

// A fault in a guard page: names the argument and the index. 1 when it was one.
static int append_memcheck_fault(uintptr_t address) {
    for (int c = 0; c < M.copy_count; ++c) {
        const guarded_copy *g = &M.copies[c];
        const guarded_region *r = g->region;
        uintptr_t data_pages = (uintptr_t)r->mapping + LEADING_GUARD_PAGES * M.page;
        uintptr_t data_end = data_pages + r->data_pages * M.page;
        if (address < (uintptr_t)r->mapping || address >= (uintptr_t)r->mapping + r->mapped_bytes ||
            (address >= data_pages && address < data_end))
            continue;
        // past the end: the argument of the group that ends last; before the start: the first one
        int named = g->argument;
        if (address >= data_end)
            for (int i = 0; i < M.argument_count; ++i)
                if (M.copy_of[i] == c && M.begin[i] + M.extents[i].bytes > M.begin[named] + M.extents[named].bytes)
                    named = i;
        append_out_of_bounds(crash_write == 1 ? "write" : crash_write == 0 ? "read" : "access", named,
                             (long long)(address - launch_address(g, M.begin[named])));
        return 1;
    }
    // An array the kernel reached through an address it was given (the persistent kernel's table
    // of layers), not as an argument: memcheck knows it only by its bytes.
    for (int i = 0; i < allocation_count; ++i) {
        const guarded_region *r = &allocations[i];
        uintptr_t data_pages = (uintptr_t)r->mapping + LEADING_GUARD_PAGES * M.page;
        if (address < (uintptr_t)r->mapping || address >= (uintptr_t)r->mapping + r->mapped_bytes ||
            (address >= data_pages && address < data_pages + r->data_pages * M.page))
            continue;
        append("out-of-bounds %s at byte offset %lld of a guarded array of %zu bytes that is not an argument "
               "(reached through an address) (memcheck)", crash_write == 1 ? "write" : crash_write == 0 ? "read" : "access",
               (long long)(address - (uintptr_t)r->data), r->bytes);
        return 1;
    }
    return 0;
}

// The canaries before every guarded allocation that no argument of the launch holds: a cooperative
// launch may reach such arrays through addresses. 1 with a report when one was overwritten.
static int check_unargued_canaries(void) {
    for (int i = 0; i < allocation_count; ++i) {
        guarded_region *r = &allocations[i];
        int argument_region = 0;
        for (int c = 0; c < M.copy_count; ++c) argument_region |= M.copies[c].region == r;
        if (argument_region) continue;
        char *data_pages = r->mapping + LEADING_GUARD_PAGES * M.page;
        for (char *byte = data_pages; byte < r->data; ++byte) {
            if ((unsigned char)*byte == CANARY) continue;
            snprintf(S.message, S.message_size, "out-of-bounds write at byte offset %lld of a guarded array of %zu "
                     "bytes that is not an argument (reached through an address) (memcheck; found after the launch, "
                     "which thread wrote it is not known)", (long long)(byte - r->data), r->bytes);
            memset(data_pages, CANARY, r->data - data_pages);
            return 1;
        }
    }
    return 0;
}

// Copies every guarded copy of a writeable array back to the caller's, and checks the canaries and
// that read-only arrays are unchanged (only when `check`: a launch that failed already has its
// report). 1 when it found a bad write.
static int memcheck_finish(int check) {
    int found = 0;
    for (int c = 0; c < M.copy_count; ++c) {
        guarded_copy *g = &M.copies[c];
        const guarded_region *r = g->region;
        if (r == &g->own && g->writeable) {
            memcpy((void *)g->original, r->data, g->bytes);
        } else if (r == &g->own && check && !found && memcmp((const void *)g->original, r->data, g->bytes)) {
            snprintf(S.message, S.message_size, "wrote to argument %s, a read-only numpy array (memcheck)",
                     M.extents[g->argument].description);
            found = 1;
        }
        char *data_pages = r->mapping + LEADING_GUARD_PAGES * M.page;
        for (char *byte = data_pages; check && !found && byte < r->data; ++byte) {
            if ((unsigned char)*byte == CANARY) continue;
            S.message[0] = 0;
            append_out_of_bounds("write", g->argument,
                                 (long long)((uintptr_t)byte - launch_address(g, M.begin[g->argument])));
            append(" (found after the launch; which thread wrote it is not known)");
            found = 1;
        }
        if (r != &g->own) memset(data_pages, CANARY, r->data - data_pages);  // an allocation's, for its next launch
    }
    if (C.requested && check && !found) found = check_unargued_canaries();
    M.copy_count = 0;
    return found;
}

// ---- memcheck: the launch's dynamic shared memory ------------------------------------------------
// Every extern __shared__ array of a module is one buffer at an address fixed when the module is
// linked (gpumlp_module_memory.dynamic: page-aligned, the capacity then a guard zone), of which a
// launch gives shared_bytes. With memcheck every whole page past them is PROT_NONE for the launch,
// so an access there faults and is reported with its byte offset; the bytes between shared_bytes
// and that page boundary (the tail, less than a page) hold a fill pattern, checked after each block
// ran (in a cooperative launch: after each of its runs between grid barriers, before its shared
// memory is saved): a write there is found then, a read there sees the pattern (0xFF bytes, a NaN,
// with poison_shared; else the canary). The protection stays between launches and changes only
// when a launch's size crosses a page boundary: ctypes never unloads a module, so the buffer's
// record of it (dynamic_accessible) stays true.
static struct {
    int active;                    // this launch has memcheck on
    char *begin, *tail, *guard, *guard_end;   // [tail, guard): the tail; [guard, guard_end): PROT_NONE
    size_t shared_bytes;
    unsigned char fill;
} DS;

// 4 KiB of each fill pattern of the tail (poison, canary), for memcmp against the tail in steps.
static unsigned char fill_page[2][4096];

// Protects the buffer's whole pages from the first page boundary at or past `accessible` bytes
// (all of them from `dynamic` for 0) and opens those before it. 0, or 1 when mprotect failed.
static int protect_dynamic_shared(gpumlp_module_memory *memory, size_t accessible) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), begin = (uintptr_t)memory->dynamic;
    const uintptr_t first = (begin + page - 1) & ~(page - 1), last = (begin + memory->dynamic_mapped) & ~(page - 1);
    auto boundary = [&](size_t bytes) {
        uintptr_t at = (begin + bytes + page - 1) & ~(page - 1);
        return at < first ? first : at > last ? last : at;
    };
    const uintptr_t now = boundary(memory->dynamic_accessible), wanted = boundary(accessible);
    if (wanted < now && mprotect((void *)wanted, now - wanted, PROT_NONE)) return 1;
    if (wanted > now && mprotect((void *)now, wanted - now, PROT_READ | PROT_WRITE)) return 1;
    memory->dynamic_accessible = wanted - begin;
    DS.begin = memory->dynamic;
    DS.guard = (char *)wanted;
    DS.guard_end = (char *)last;
    return 0;
}

// Sets up the launch's guard (memcheck) or lifts it; 0, or 1 with a message.
static int guard_dynamic_shared(gpumlp_module_memory *memory, size_t shared_bytes, int memcheck, int poison_shared) {
    DS.active = 0;
    if (protect_dynamic_shared(memory, memcheck ? shared_bytes : memory->dynamic_mapped)) {
        snprintf(S.message, S.message_size, "memcheck could not protect the pages past %zu bytes of dynamic shared "
                 "memory", shared_bytes);
        return 1;
    }
    if (!memcheck) return 0;
    DS.active = 1;
    DS.shared_bytes = shared_bytes;
    DS.tail = memory->dynamic + shared_bytes;
    DS.fill = poison_shared ? 0xff : CANARY;
    if (!fill_page[0][0]) {
        memset(fill_page[0], 0xff, sizeof fill_page[0]);
        memset(fill_page[1], CANARY, sizeof fill_page[1]);
    }
    if (DS.guard > DS.tail) memset(DS.tail, DS.fill, DS.guard - DS.tail);
    return 0;
}

// 1,234,567: the sizes and offsets of a dynamic shared memory report.
static const char *with_commas(unsigned long long value, char text[32]) {
    char digits[24];
    int length = snprintf(digits, sizeof digits, "%llu", value), at = 0;
    for (int i = 0; i < length; ++i) {
        if (i && (length - i) % 3 == 0) text[at++] = ',';
        text[at++] = digits[i];
    }
    text[at] = 0;
    return text;
}

static void append_dynamic_shared_overrun(const char *verb, uintptr_t address) {
    char bytes[32], offset[32];
    append("%s past the %s bytes of dynamic shared memory the launch gives (byte offset %s of the dynamic shared "
           "memory) (memcheck)", verb, with_commas(DS.shared_bytes, bytes),
           with_commas(address - (uintptr_t)DS.begin, offset));
}

// A fault in the PROT_NONE pages past the launch's dynamic shared memory. 1 when it was one.
static int append_dynamic_shared_fault(uintptr_t address) {
    if (!DS.active || address < (uintptr_t)DS.guard || address >= (uintptr_t)DS.guard_end) return 0;
    append_dynamic_shared_overrun(crash_write == 1 ? "wrote" : crash_write == 0 ? "read" : "accessed", address);
    return 1;
}

// After a block ran: 1, with the launch failed, when a byte of the tail lost its fill pattern.
static int dynamic_shared_tail_overwritten(void) {
    if (!DS.active) return 0;
    const unsigned char *pattern = fill_page[DS.fill == 0xff ? 0 : 1];
    for (char *chunk = DS.tail; chunk < DS.guard; chunk += sizeof fill_page[0]) {
        size_t length = (size_t)(DS.guard - chunk) < sizeof fill_page[0] ? (size_t)(DS.guard - chunk)
                                                                          : sizeof fill_page[0];
        if (!memcmp(chunk, pattern, length)) continue;
        char *byte = chunk;
        while ((unsigned char)*byte == DS.fill) ++byte;
        S.message[0] = 0;
        append_dynamic_shared_overrun("wrote", (uintptr_t)byte);
        append(" in block (%u,%u,%u) (found after the block ran; which thread wrote it is not known)", blockIdx.x,
               blockIdx.y, blockIdx.z);
        S.failed = 1;
        return 1;
    }
    return 0;
}

static void report_crash(void) {
    const char *what = crash_signal == SIGSEGV ? "SIGSEGV (invalid memory access)"
                     : crash_signal == SIGBUS  ? "SIGBUS (misaligned or unmapped memory access)"
                     : crash_signal == SIGFPE  ? "SIGFPE (integer division by zero?)"
                     : crash_signal == SIGILL  ? "SIGILL (__trap or illegal instruction)"
                                               : "SIGABRT (assert failed or abort called)";
    const fiber *f = &S.fibers[S.current];
    S.message[0] = 0;
    if (crash_signal == SIGSEGV && (append_memcheck_fault((uintptr_t)crash_address) ||
                                    append_dynamic_shared_fault((uintptr_t)crash_address)))
        append(" in block (%u,%u,%u), thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, f->index.x, f->index.y,
               f->index.z);
    else
        snprintf(S.message, S.message_size, "crashed with %s at address %p in block (%u,%u,%u), thread (%u,%u,%u)",
                 what, crash_address, blockIdx.x, blockIdx.y, blockIdx.z, f->index.x, f->index.y, f->index.z);
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

// ---- block order and floating-point mode ---------------------------------------------------------
enum block_order { LAUNCH_ORDER, REVERSED_ORDER, RANDOM_ORDER };

// A bijection of [0, 2^bits) keyed by the seed (xor, multiplication by an odd number and xorshift
// are each invertible modulo 2^bits); walking 0, 1, ... and skipping values >= the block count
// visits every block once in a shuffled order without storing a permutation.
static unsigned long long shuffle_bits(unsigned long long x, unsigned long long seed, int bits) {
    unsigned long long mask = bits >= 64 ? ~0ull : (1ull << bits) - 1;
    for (int round = 0; round < 4; ++round) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        x = ((x ^ (seed >> 20)) * ((seed >> 7) | 1)) & mask;
        x ^= x >> (bits / 2 + 1);
    }
    return x;
}

static void run_grid_cooperatively(const unsigned int grid[3], gpumlp_module_memory *memory,
                                   size_t shared_bytes, int poison_shared, int order, unsigned long long seed);

static void run_grid(const unsigned int grid[3], gpumlp_module_memory *memory, size_t shared_bytes,
                     int poison_shared, int order, unsigned long long seed) {
    if (C.requested) {
        run_grid_cooperatively(grid, memory, shared_bytes, poison_shared, order, seed);
        return;
    }
    unsigned long long columns = grid[0], plane = columns * grid[1], blocks = plane * grid[2];
    int bits = 1;
    while (bits < 64 && (1ull << bits) < blocks) ++bits;
    unsigned long long steps = order == RANDOM_ORDER ? (bits >= 64 ? ~0ull : 1ull << bits) : blocks;
    for (unsigned long long step = 0; step < steps; ++step) {
        unsigned long long block = order == LAUNCH_ORDER ? step
                                 : order == REVERSED_ORDER ? blocks - 1 - step
                                                           : shuffle_bits(step, seed, bits);
        if (block >= blocks) continue;
        blockIdx = uint3{(unsigned int)(block % columns), (unsigned int)(block % plane / columns),
                         (unsigned int)(block / plane)};
        if (poison_shared) {
            // 0xFF bytes are a NaN in every float and double: reading before writing shows.
            memset(memory->static_begin, 0xff, memory->static_end - memory->static_begin);
            memset(memory->dynamic, 0xff, shared_bytes);
        }
        if (run_block() || dynamic_shared_tail_overwritten()) return;
    }
}

// CuPy compiles every kernel with -ftz=true: float results and operands that are subnormal count
// as zero. The same bits of the CPU's control register (x86-64 MXCSR FTZ and DAZ; AArch64 FPCR.FZ)
// are set for the launch only, so numpy outside the kernel keeps IEEE subnormals. They cover double
// too, which the GPU keeps IEEE: no kernel of the project computes subnormal doubles.
static unsigned long long enter_flush_to_zero(void) {
#if defined(__x86_64__)
    unsigned int saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040u);
    return saved;
#elif defined(__aarch64__)
    unsigned long long saved;
    __asm__ volatile("mrs %0, fpcr" : "=r"(saved));
    __asm__ volatile("msr fpcr, %0" : : "r"(saved | (1ull << 24)));
    return saved;
#else
#error "the emulator's flush-to-zero mode knows x86-64 and AArch64 only"
#endif
}

static void leave_flush_to_zero(unsigned long long saved) {
#if defined(__x86_64__)
    _mm_setcsr((unsigned int)saved);
#elif defined(__aarch64__)
    __asm__ volatile("msr fpcr, %0" : : "r"(saved));
#endif
}

// Returns 0, or 1 with the reason in `message`. `dimensions` is the grid then the block (x, y, z);
// `slots` holds one 8-byte slot per kernel argument: an array's data pointer or a scalar's bytes;
// `extents` (only with MEMCHECK) says which slots are arrays and how large.
extern "C" GPUMLP_EXPORT int gpumlp_launch(kernel_entry entry, const unsigned int dimensions[6], size_t shared_bytes,
                                           gpumlp_module_memory *memory, int flags, int block_order,
                                           unsigned long long seed, const unsigned long long *slots,
                                           int argument_count, const gpumlp_argument_extent *extents,
                                           char *message, size_t message_size) {
    enum { POISON_SHARED = 1, REVERSE_THREADS = 2, FLUSH_TO_ZERO = 4, MEMCHECK = 8, COOPERATIVE = 16,
           SPLIT_AT_WAIT = 32 };
    const unsigned int *grid = dimensions, *block = dimensions + 3;
    pthread_mutex_lock(&launch_lock);
    S.message = message;
    S.message_size = message_size;
    message[0] = 0;
    S.failed = 0;
    C.requested = (flags & COOPERATIVE) != 0;
    C.split_at_wait = (flags & SPLIT_AT_WAIT) != 0;
    C.active = C.parked = 0;
    C.grid_barriers = 0;
    unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (threads == 0 || threads > MAX_THREADS || grid[0] == 0 || grid[1] == 0 || grid[2] == 0) {
        snprintf(message, message_size, "invalid launch: grid (%u,%u,%u), block (%u,%u,%u); a block has 1 to %d threads",
                 grid[0], grid[1], grid[2], block[0], block[1], block[2], MAX_THREADS);
        pthread_mutex_unlock(&launch_lock);
        return 1;
    }
    if (argument_count > MAX_ARGUMENTS) {
        snprintf(message, message_size, "invalid launch: the emulator passes at most %d arguments", MAX_ARGUMENTS);
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
    unsigned long long own_slots[MAX_ARGUMENTS];
    void *arguments[MAX_ARGUMENTS];
    for (int i = 0; i < argument_count; ++i) {
        own_slots[i] = slots[i];
        arguments[i] = &own_slots[i];
    }
    const int memcheck = (flags & MEMCHECK) != 0;
    if (memcheck && memcheck_prepare(own_slots, extents, argument_count)) {
        memcheck_finish(0);
        pthread_mutex_unlock(&launch_lock);
        return 1;
    }
    if (guard_dynamic_shared(memory, shared_bytes, memcheck, flags & POISON_SHARED)) {
        if (memcheck) memcheck_finish(0);
        pthread_mutex_unlock(&launch_lock);
        return 1;
    }
    S.owner = pthread_self();
    S.entry = entry;
    S.arguments = arguments;
    S.thread_count = (int)threads;
    S.reverse_order = (flags & REVERSE_THREADS) != 0;
    blockDim = dim3(block[0], block[1], block[2]);
    gridDim = dim3(grid[0], grid[1], grid[2]);
    ensure_alternate_signal_stack();
    ensure_crash_handlers();
    const int flush_to_zero = (flags & FLUSH_TO_ZERO) != 0;
    const unsigned long long floating_state = flush_to_zero ? enter_flush_to_zero() : 0;
    if (sigsetjmp(crash_jump, 0)) {
        if (flush_to_zero) leave_flush_to_zero(floating_state);
        report_crash();
        if (memcheck) memcheck_finish(0);
        pthread_mutex_unlock(&launch_lock);
        return 1;
    }
    crash_armed = 1;
    run_grid(grid, memory, shared_bytes, flags & POISON_SHARED, block_order, seed);
    crash_armed = 0;
    if (flush_to_zero) leave_flush_to_zero(floating_state);
    int failed = S.failed || message[0] != 0;
    if (memcheck) failed |= memcheck_finish(!failed);
    pthread_mutex_unlock(&launch_lock);
    return failed;
}

// ---- cooperative launches ----------------------------------------------------------------------
// Between two grid barriers the blocks run one after another, each until all of its threads wait
// at the barrier (or exited): a schedule a GPU may also choose, so a kernel that reads what another
// block writes without a grid barrier in between reads stale or poisoned memory here. The block
// order of each such phase is the launch order, reversed, or a seeded shuffle drawn anew for every
// phase (RANDOM_ORDER). Each block keeps its own fibers, stacks and a saved copy of its shared
// memory, which is swapped in while it runs. Only the x86-64 context switch is used: a copied
// ucontext_t keeps a pointer into its old location. memcheck, flush-to-zero and the crash report
// are gpumlp_launch's, around the whole grid.
// Each stack's guard page is a mapping of its own: Linux allows ~65k mappings per process.
enum { MAX_COOPERATIVE_THREADS = 16 * 1024 };

static struct {
    char *stacks;               // MAX_COOPERATIVE_THREADS stacks with guard pages, mapped once
    fiber *fibers;              // (blocks, threads) saved fibers
    char *shared;               // (blocks, shared bytes) saved shared memory
    int *exited, *order;        // per block: exited threads; the run order of the phase
    size_t capacity_blocks, capacity_shared;
} CS;

static void require_cooperative(const char *call, int line) {
    if (!C.active)
        fail("%s on line %d in a launch that is not cooperative: launch the kernel with launch_cooperative "
             "(on a GPU, cudaLaunchCooperativeKernel)", call, line);
}

static void park_at_grid_barrier(int kind, int line) {
    fiber *f = &S.fibers[S.current];
    f->state = AT_GRID_BARRIER;
    f->barrier_kind = kind;
    f->barrier_line = line;
    ++C.parked;
    switch_away();
}

// Fails the launch for a misuse of barrier_arrive / barrier_wait by the running thread: `call` on
// `line`, or with line 0 `call` is what the thread does ("exits"); names the thread's pending arrive.
[[noreturn]] static void fail_split_barrier(const char *call, int line) {
    const int pending = S.fibers[S.current].pending_arrive_line;
    if (line) snprintf(S.message, S.message_size, "%s on line %d ", call, line);
    else snprintf(S.message, S.message_size, "a thread %s ", call);
    if (pending) append("while its barrier_arrive on line %d has no barrier_wait yet", pending);
    else append("without a barrier_arrive before it");
    append(" (block (%u,%u,%u), thread (%u,%u,%u)): ", blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y,
           threadIdx.z);
    append(pending ? "every barrier_arrive of a thread needs its barrier_wait before the thread's next grid barrier "
                     "or its exit"
                   : "a thread's barrier_wait completes its own barrier_arrive");
    abandon_launch();
}

extern "C" GPUMLP_EXPORT void gpumlp_grid_sync(int line) {
    require_cooperative("this_grid().sync()", line);
    if (S.fibers[S.current].pending_arrive_line) fail_split_barrier("this_grid().sync()", line);
    park_at_grid_barrier(GRID_SYNC, line);
}

// The two halves of a split grid barrier: by default barrier_arrive is the grid barrier (a block
// that writes what others read after its arrive shows), with SPLIT_AT_WAIT barrier_wait is (a block
// that reads what others write before its wait shows). The other half keeps CUDA's block barrier.
extern "C" GPUMLP_EXPORT void gpumlp_grid_arrive(int line) {
    require_cooperative("barrier_arrive", line);
    fiber *f = &S.fibers[S.current];
    if (f->pending_arrive_line) fail_split_barrier("barrier_arrive", line);
    f->pending_arrive_line = line;
    if (C.split_at_wait) gpumlp_barrier(line, BLOCK_OF_ARRIVE, 0);
    else park_at_grid_barrier(GRID_ARRIVE, line);
}

extern "C" GPUMLP_EXPORT void gpumlp_grid_wait(int line) {
    require_cooperative("barrier_wait", line);
    fiber *f = &S.fibers[S.current];
    if (!f->pending_arrive_line) fail_split_barrier("barrier_wait", line);
    f->pending_arrive_line = 0;
    if (C.split_at_wait) park_at_grid_barrier(GRID_WAIT, line);
    else gpumlp_barrier(line, BLOCK_OF_WAIT, 0);
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

static void phase_order(int blocks, int order, unsigned long long *random_state) {
    for (int i = 0; i < blocks; ++i) CS.order[i] = order == REVERSED_ORDER ? blocks - 1 - i : i;
    if (order == RANDOM_ORDER)
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

// Whether a thread of block `b` waits at the grid barrier `kind` on `line`.
static int block_waits_at(int b, int threads, int kind, int line) {
    for (int t = 0; t < threads; ++t) {
        const fiber *f = &CS.fibers[(size_t)b * threads + t];
        if (f->state == AT_GRID_BARRIER && f->barrier_kind == kind && f->barrier_line == line) return 1;
    }
    return 0;
}

// After a phase every block's threads wait at the grid barrier or have exited. Returns 1 when all
// of them wait at the same barrier (then they are released), 0 when every thread exited, and fails
// the launch otherwise.
static int release_grid_barrier(int blocks, int threads) {
    int waiting = 0, line = -1, kind = -1, mixed = 0;
    for (int b = 0; b < blocks; ++b)
        for (int t = 0; t < threads; ++t) {
            const fiber *f = &CS.fibers[(size_t)b * threads + t];
            if (f->state != AT_GRID_BARRIER) continue;
            if (!waiting) line = f->barrier_line, kind = f->barrier_kind;
            mixed |= f->barrier_line != line || f->barrier_kind != kind;
            ++waiting;
        }
    if (waiting == 0) return 0;
    if (waiting != blocks * threads || mixed) {
        snprintf(S.message, S.message_size, "deadlock at the grid barrier (%s on line %d): blocks ",
                 barrier_name(kind), line);
        append_block_ranges(blocks, [&](int b) { return CS.exited[b] < threads; });
        append(" wait");
        if (waiting != blocks * threads) {
            append(" but threads of blocks ");
            append_block_ranges(blocks, [&](int b) { return CS.exited[b] > 0; });
            append(" have exited");
        } else {
            // each barrier (at most 4) with the blocks that have threads at it
            struct { int kind, line; } seen[4];
            int seen_count = 0;
            for (size_t i = 0; i < (size_t)blocks * threads && seen_count < 4; ++i) {
                int known = 0;
                for (int j = 0; j < seen_count; ++j)
                    known |= seen[j].kind == CS.fibers[i].barrier_kind && seen[j].line == CS.fibers[i].barrier_line;
                if (!known) seen[seen_count++] = {CS.fibers[i].barrier_kind, CS.fibers[i].barrier_line};
            }
            append(" at different grid barriers (");
            for (int j = 0; j < seen_count; ++j) {
                append(j ? "; blocks " : "blocks ");
                append_block_ranges(blocks,
                                    [&](int b) { return block_waits_at(b, threads, seen[j].kind, seen[j].line); });
                append(" at %s on line %d", barrier_name(seen[j].kind), seen[j].line);
            }
            append(")");
        }
        append("; every thread of the grid must reach the same grid barrier");
        S.failed = 1;
        return 0;
    }
    for (size_t i = 0; i < (size_t)blocks * threads; ++i) CS.fibers[i].state = RUNNABLE;
    ++C.grid_barriers;
    return 1;
}

// Runs the grid of a cooperative launch; a failure is left in S.failed and S.message.
static void run_grid_cooperatively(const unsigned int grid[3], gpumlp_module_memory *memory,
                                   size_t shared_bytes, int poison_shared, int order, unsigned long long seed) {
    const int threads = S.thread_count;
    const unsigned long long block_count = (unsigned long long)grid[0] * grid[1] * grid[2];
    const size_t static_bytes = (size_t)(memory->static_end - memory->static_begin);
    const size_t shared_total = static_bytes + shared_bytes;
#if !defined(__x86_64__) || defined(GPUMLP_FORCE_UCONTEXT)
    snprintf(S.message, S.message_size, "cooperative launches need the emulator's x86-64 context switch");
    S.failed = 1;
    return;
#endif
    if (block_count * threads > MAX_COOPERATIVE_THREADS) {
        snprintf(S.message, S.message_size, "cooperative launch of %llu blocks of %d threads: the emulator runs "
                 "at most %d threads of a cooperative launch at once", block_count, threads, MAX_COOPERATIVE_THREADS);
        S.failed = 1;
        return;
    }
    const int blocks = (int)block_count;
    if (allocate_cooperative(blocks, threads, shared_total)) {
        snprintf(S.message, S.message_size, "could not allocate the fibers of a cooperative launch");
        S.failed = 1;
        return;
    }
    const size_t stride = STACK_BYTES + (size_t)sysconf(_SC_PAGESIZE);
    for (int b = 0; b < blocks; ++b) {
        for (int t = 0; t < threads; ++t) {
            fiber *f = &CS.fibers[(size_t)b * threads + t];
            char *stack = CS.stacks + ((size_t)b * threads + t) * stride;
            context_prepare(&f->context, stack + stride - STACK_BYTES, STACK_BYTES, fiber_main);
            f->state = RUNNABLE;
            f->pending_arrive_line = 0;
            f->index = uint3{t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
        }
        CS.exited[b] = 0;
        // 0xFF bytes are a NaN in every float and double: reading before writing shows.
        memset(CS.shared + (size_t)b * shared_total, poison_shared ? 0xff : 0, shared_total);
    }
    C.active = 1;
    unsigned long long random_state = seed;
    do {
        phase_order(blocks, order, &random_state);
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
            if (S.failed || S.deadlocked || dynamic_shared_tail_overwritten()) return;
            memcpy(saved, S.fibers, threads * sizeof(fiber));
            memcpy(saved_shared, memory->static_begin, static_bytes);
            memcpy(saved_shared + static_bytes, memory->dynamic, shared_bytes);
            CS.exited[b] = S.exited;
        }
    } while (release_grid_barrier(blocks, threads));
    C.active = C.parked = 0;
}
