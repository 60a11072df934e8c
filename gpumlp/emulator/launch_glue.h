// Included by the glue code the emulator appends to every kernel source: turns a kernel into a
// C-ABI entry point taking its arguments as an array of pointers, and describes its parameter
// types with the compiler's own view of them (typedefs resolved) for the argument checks in Python.
#pragma once

// One character per C type: the numpy scalar type a parameter takes ('x': none, 'v': void).
template <class T> struct gpumlp_type_code { static constexpr char value = 'x'; };
#define GPUMLP_TYPE_CODE(T, code) \
    template <> struct gpumlp_type_code<T> { static constexpr char value = code; };
GPUMLP_TYPE_CODE(void, 'v')
GPUMLP_TYPE_CODE(bool, '?')
GPUMLP_TYPE_CODE(char, 'b')
GPUMLP_TYPE_CODE(signed char, 'b')
GPUMLP_TYPE_CODE(unsigned char, 'B')
GPUMLP_TYPE_CODE(short, 'h')
GPUMLP_TYPE_CODE(unsigned short, 'H')
GPUMLP_TYPE_CODE(int, 'i')
GPUMLP_TYPE_CODE(unsigned int, 'I')
GPUMLP_TYPE_CODE(long, 'q')
GPUMLP_TYPE_CODE(unsigned long, 'Q')
GPUMLP_TYPE_CODE(long long, 'q')
GPUMLP_TYPE_CODE(unsigned long long, 'Q')
GPUMLP_TYPE_CODE(float, 'f')
GPUMLP_TYPE_CODE(double, 'd')
#undef GPUMLP_TYPE_CODE

// Two characters per parameter: ('P', pointee code) for a pointer, (scalar code, '_') otherwise.
template <class T> struct gpumlp_parameter_code {
    static constexpr char kind = gpumlp_type_code<T>::value, pointee = '_';
};
template <class T> struct gpumlp_parameter_code<T *> {
    static constexpr char kind = 'P', pointee = gpumlp_type_code<typename std::remove_cv<T>::type>::value;
};

template <class... P>
constexpr std::array<char, 2 * sizeof...(P) + 1> gpumlp_signature_of(void (*)(P...)) {
    std::array<char, 2 * sizeof...(P) + 1> text{};
    const char kinds[] = {gpumlp_parameter_code<P>::kind..., 0};
    const char pointees[] = {gpumlp_parameter_code<P>::pointee..., 0};
    for (size_t i = 0; i < sizeof...(P); ++i) {
        text[2 * i] = kinds[i];
        text[2 * i + 1] = pointees[i];
    }
    return text;
}

template <class... P, size_t... I>
static inline void gpumlp_invoke_with(void (*kernel)(P...), void *const *arguments, std::index_sequence<I...>) {
    kernel(*static_cast<P *>(arguments[I])...);
}

template <class... P>
static inline void gpumlp_invoke(void (*kernel)(P...), void *const *arguments) {
    (void)arguments;
    gpumlp_invoke_with(kernel, arguments, std::index_sequence_for<P...>{});
}
