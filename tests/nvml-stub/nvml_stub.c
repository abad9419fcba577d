/*
 * A stand-in libnvidia-ml.so.1 for tests on machines without a GPU (this project's CI).
 * It implements the NVML entry points nvml-wrapper calls, with figures read, on every call,
 * from the file named by $NVML_STUB_FILE:
 *
 *   gpu <name-without-spaces> <uuid> <total-bytes> <used-bytes>
 *   proc <gpu-index> <pid> <bytes>
 *   auto <tag>
 *
 * With `auto TAG`, every live process whose environment has NVML_STUB_VRAM=TAG:BYTES is a
 * compute process using BYTES on the GPU its CUDA_VISIBLE_DEVICES names first (0 without
 * one), added to that GPU's used memory; `proc` lines of processes that are gone are
 * dropped. So an engine modvisord starts "uses" VRAM where modvisord placed it, and frees it
 * when it exits, like a real one (the tag keeps concurrent tests apart).
 *
 * Built with -DNO_V3 it lacks nvmlDeviceGetComputeRunningProcesses_v3, like drivers older
 * than R510, so the legacy (v2) query must be used.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <dirent.h>
#include <ctype.h>
#include <unistd.h>

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId, computeInstanceId; } nvmlProcessInfo_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9

#define MAXG 8
#define MAXP 64
static struct gpu { char name[96], uuid[96]; unsigned long long total, used; } gpus[MAXG];
static struct proc { unsigned gpu, pid; unsigned long long bytes; } procs[MAXP];
static int ngpu, nproc;
static char auto_tag[64];

static int alive(unsigned pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    return access(path, F_OK) == 0;
}

/* The NVML_STUB_VRAM=TAG:BYTES and CUDA_VISIBLE_DEVICES of one process, if tagged. */
static void scan_one(unsigned pid) {
    char path[64], buf[65536];
    snprintf(path, sizeof path, "/proc/%u/environ", pid);
    FILE *f = fopen(path, "r");
    if (!f) return;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    unsigned long long bytes = 0;
    int found = 0;
    unsigned gpu = 0;
    size_t tl = strlen(auto_tag);
    for (size_t i = 0; i < n; i += strlen(buf + i) + 1) {
        const char *v = buf + i;
        if (!strncmp(v, "NVML_STUB_VRAM=", 15) && !strncmp(v + 15, auto_tag, tl) && v[15 + tl] == ':') {
            bytes = strtoull(v + 16 + tl, NULL, 10);
            found = 1;
        } else if (!strncmp(v, "CUDA_VISIBLE_DEVICES=", 21)) {
            gpu = (unsigned)strtoul(v + 21, NULL, 10);
        }
    }
    if (!found || (int)gpu >= ngpu || nproc >= MAXP) return;
    procs[nproc].gpu = gpu; procs[nproc].pid = pid; procs[nproc].bytes = bytes;
    nproc++;
    gpus[gpu].used += bytes;
}

static void scan_auto(void) {
    int k = 0;
    for (int i = 0; i < nproc; i++) if (alive(procs[i].pid)) procs[k++] = procs[i];
    nproc = k;
    DIR *d = opendir("/proc");
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (!isdigit((unsigned char)e->d_name[0])) continue;
        scan_one((unsigned)strtoul(e->d_name, NULL, 10));
    }
    closedir(d);
}

static int load(void) {
    const char *path = getenv("NVML_STUB_FILE");
    FILE *f = path ? fopen(path, "r") : NULL;
    ngpu = nproc = 0;
    auto_tag[0] = 0;
    if (!f) return -1;
    char kind[16];
    while (fscanf(f, "%15s", kind) == 1) {
        if (!strcmp(kind, "gpu") && ngpu < MAXG) {
            struct gpu *g = &gpus[ngpu];
            if (fscanf(f, "%95s %95s %llu %llu", g->name, g->uuid, &g->total, &g->used) == 4) ngpu++;
        } else if (!strcmp(kind, "auto")) {
            if (fscanf(f, "%63s", auto_tag) != 1) auto_tag[0] = 0;
        } else if (!strcmp(kind, "proc") && nproc < MAXP) {
            struct proc *p = &procs[nproc];
            if (fscanf(f, "%u %u %llu", &p->gpu, &p->pid, &p->bytes) == 3) nproc++;
        } else {
            int c;
            while ((c = fgetc(f)) != '\n' && c != EOF) {}
        }
    }
    fclose(f);
    if (auto_tag[0]) scan_auto();
    return 0;
}

static int index_of(nvmlDevice_t d) { return (int)((uintptr_t)d) - 1; }

nvmlReturn_t nvmlInit_v2(void) { return load() == 0 ? NVML_SUCCESS : NVML_ERROR_DRIVER_NOT_LOADED; }
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return nvmlInit_v2(); }
nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }
const char *nvmlErrorString(nvmlReturn_t r) { (void)r; return "nvml stub error"; }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) { load(); *count = (unsigned)ngpu; return NVML_SUCCESS; }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) {
    load();
    if (i >= (unsigned)ngpu) return NVML_ERROR_INVALID_ARGUMENT;
    *d = (nvmlDevice_t)(uintptr_t)(i + 1);
    return NVML_SUCCESS;
}

static nvmlReturn_t copy(char *dst, unsigned len, const char *src) {
    if (strlen(src) + 1 > len) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(dst, src);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int len) {
    int i = index_of(d);
    if (i < 0 || i >= ngpu) return NVML_ERROR_INVALID_ARGUMENT;
    char buf[96];
    snprintf(buf, sizeof buf, "%s", gpus[i].name);
    for (char *c = buf; *c; c++) if (*c == '_') *c = ' ';
    return copy(name, len, buf);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int len) {
    int i = index_of(d);
    if (i < 0 || i >= ngpu) return NVML_ERROR_INVALID_ARGUMENT;
    return copy(uuid, len, gpus[i].uuid);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
    load();
    int i = index_of(d);
    if (i < 0 || i >= ngpu) return NVML_ERROR_INVALID_ARGUMENT;
    m->total = gpus[i].total; m->used = gpus[i].used; m->reserved = 0; m->free = gpus[i].total - gpus[i].used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
    nvmlMemory_v2_t v2;
    nvmlReturn_t r = nvmlDeviceGetMemoryInfo_v2(d, &v2);
    m->total = v2.total; m->used = v2.used; m->free = v2.free;
    return r;
}

static nvmlReturn_t processes(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos) {
    load();
    int g = index_of(d);
    if (g < 0 || g >= ngpu) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned n = 0;
    for (int i = 0; i < nproc; i++) if ((int)procs[i].gpu == g) n++;
    if (infos == NULL || *count < n) { *count = n; return n == 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE; }
    unsigned k = 0;
    for (int i = 0; i < nproc; i++) {
        if ((int)procs[i].gpu != g) continue;
        infos[k].pid = procs[i].pid; infos[k].usedGpuMemory = procs[i].bytes;
        infos[k].gpuInstanceId = 0xFFFFFFFF; infos[k].computeInstanceId = 0xFFFFFFFF;
        k++;
    }
    *count = k;
    return NVML_SUCCESS;
}

#ifndef NO_V3
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *p) { return processes(d, c, p); }
#endif
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *p) { return processes(d, c, p); }
