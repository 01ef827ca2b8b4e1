//! A plugin's module, compiled once per config ([`Compiled`], shared by
//! every worker), and one thread's instance of it ([`ThreadPlugin`]): the
//! thread's requests run in it; it is started when first needed and
//! dropped after a trap. The workers share the engine, whose only locks on
//! the call path are wasmi's spin locks around its stack pool, taken once
//! as a call starts and once as it ends.

use std::sync::atomic::{AtomicU64, Ordering};

use wasmi::{CompilationMode, Config, Engine, Func, Linker, Module, Store, StoreLimitsBuilder, TypedFunc};

use super::host::{self, HostState};
use super::{Callback, WasmError, WasmPlugin};

/// Root context id: the plugin's; HTTP contexts count up from here.
pub(super) const ROOT_ID: i32 = 1;

/// Makes instance generations unique across threads and plugins, so a
/// context knows whether the instance it was created in is still the one.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// The module as compiled (validated and translated), with the host
/// functions it links to.
pub(super) struct Compiled {
    engine: Engine,
    module: Module,
    linker: Linker<HostState>,
}

pub(super) struct ThreadPlugin {
    pub worker: Option<Worker>,
}

/// A stream callback: `(context_id, size, end_of_stream) -> action`, or the
/// pre-0.2 form without `end_of_stream` that some SDKs still export.
#[derive(Clone, Copy)]
pub(super) enum StreamFn {
    WithEnd(TypedFunc<(i32, i32, i32), i32>),
    WithoutEnd(TypedFunc<(i32, i32), i32>),
}

/// The callbacks the module exports (the optional ones it may leave out).
#[derive(Clone, Copy)]
pub(super) struct Exports {
    pub context_create: TypedFunc<(i32, i32), ()>,
    pub request_headers: Option<StreamFn>,
    pub request_body: Option<StreamFn>,
    pub response_headers: Option<StreamFn>,
    pub response_body: Option<StreamFn>,
    pub log: Option<TypedFunc<i32, ()>>,
    pub done: Option<TypedFunc<i32, i32>>,
    pub delete: Option<TypedFunc<i32, ()>>,
}

/// A running instance of the module.
pub(super) struct Worker {
    pub generation: u64,
    pub store: Store<HostState>,
    pub exports: Exports,
    next_id: i32,
}

impl Worker {
    pub fn next_context_id(&mut self) -> i32 {
        self.next_id = if self.next_id == i32::MAX { ROOT_ID + 1 } else { self.next_id + 1 };
        self.next_id
    }
}

/// Fuel metered; functions translated when the module is compiled, not on
/// first call (lazy translation charges its work to the first request's
/// fuel, so a request's cost would depend on what ran before it).
fn engine() -> Engine {
    let mut config = Config::default();
    // The engine is shared by the workers and lends each call a stack from
    // its pool; the pool keeps at most this many. wasmi's default (2)
    // would make a third worker allocate a stack per call. The pool holds
    // only stacks made for calls that ran at once: one per worker.
    config.consume_fuel(true).compilation_mode(CompilationMode::Eager).set_max_cached_stacks(1024);
    Engine::new(&config)
}

impl Compiled {
    /// Parses, validates and translates the module, once.
    pub fn new(module: &[u8]) -> Result<Self, WasmError> {
        let engine = engine();
        let module = Module::new(&engine, module).map_err(|e| WasmError::Module(format!("not a valid WebAssembly module: {e}")))?;
        check_exports(&module)?;
        let mut linker = Linker::new(&engine);
        host::define(&mut linker).map_err(|e| WasmError::Module(format!("host functions: {e}")))?;
        Ok(Compiled { engine, module, linker })
    }
}

impl ThreadPlugin {
    pub fn new() -> Self {
        ThreadPlugin { worker: None }
    }

    /// The running instance, started if there is none.
    pub fn worker(&mut self, plugin: &WasmPlugin) -> Result<&mut Worker, WasmError> {
        if self.worker.is_none() {
            self.worker = Some(self.start(plugin)?);
            plugin.instances.fetch_add(1, Ordering::Relaxed);
        }
        Ok(self.worker.as_mut().expect("just started"))
    }

    /// Instantiates the module and brings its root context up:
    /// `_initialize` (or `_start`), then `proxy_on_context_create`,
    /// `proxy_on_vm_start` and `proxy_on_configure`, each with the plugin's
    /// fuel.
    fn start(&self, plugin: &WasmPlugin) -> Result<Worker, WasmError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(plugin.limits.memory_bytes)
            .memories(1)
            .tables(4)
            .table_elements(100_000)
            .instances(1)
            .build();
        let state = HostState::new(plugin.name.clone(), plugin.config.clone(), limits, ROOT_ID);
        let compiled = &plugin.compiled;
        let mut store = Store::new(&compiled.engine, state);
        store.limiter(|s| &mut s.limits);
        let fuel = plugin.limits.fuel;
        set_fuel(&mut store, fuel);
        let instance = compiled.linker.instantiate_and_start(&mut store, &compiled.module).map_err(|e| {
            if is_out_of_fuel(&e) {
                WasmError::Configure(format!("its start function ran out of fuel ({fuel})"))
            } else {
                WasmError::Module(format!("cannot be instantiated: {e}"))
            }
        })?;
        let memory = instance.get_memory(&store, "memory").ok_or_else(|| WasmError::Module("exports no memory named `memory`".into()))?;
        let alloc = ["proxy_on_memory_allocate", "malloc"]
            .iter()
            .find_map(|name| instance.get_typed_func::<i32, i32>(&store, name).ok())
            .ok_or_else(|| WasmError::Module("exports no allocator: `proxy_on_memory_allocate` or `malloc` (i32) -> i32".into()))?;
        store.data_mut().memory = Some(memory);
        store.data_mut().alloc = Some(alloc);

        let typed = |name: &str| instance.get_func(&store, name);
        let exports = Exports {
            context_create: required(&store, typed("proxy_on_context_create"), "proxy_on_context_create")?,
            request_headers: stream_fn(&store, typed("proxy_on_request_headers"), "proxy_on_request_headers")?,
            request_body: stream_fn(&store, typed("proxy_on_request_body"), "proxy_on_request_body")?,
            response_headers: stream_fn(&store, typed("proxy_on_response_headers"), "proxy_on_response_headers")?,
            response_body: stream_fn(&store, typed("proxy_on_response_body"), "proxy_on_response_body")?,
            log: optional(&store, typed("proxy_on_log"), "proxy_on_log")?,
            done: optional(&store, typed("proxy_on_done"), "proxy_on_done")?,
            delete: optional(&store, typed("proxy_on_delete"), "proxy_on_delete")?,
        };
        let vm_start: Option<TypedFunc<(i32, i32), i32>> = optional(&store, typed("proxy_on_vm_start"), "proxy_on_vm_start")?;
        let configure: Option<TypedFunc<(i32, i32), i32>> = optional(&store, typed("proxy_on_configure"), "proxy_on_configure")?;
        let init = ["_initialize", "_start"].iter().find_map(|n| instance.get_typed_func::<(), ()>(&store, n).ok());

        let setup = |callback: Callback, e: wasmi::Error| match classify(callback, fuel, e) {
            WasmError::OutOfFuel { callback, fuel } => WasmError::Configure(format!("{} ran out of fuel ({fuel})", callback.export())),
            other => WasmError::Configure(other.to_string()),
        };
        if let Some(init) = init {
            set_fuel(&mut store, fuel);
            if let Err(e) = init.call(&mut store, ()) {
                // A WASI command ends with proc_exit(0): that is a clean start.
                if e.i32_exit_status() != Some(0) {
                    return Err(setup(Callback::Initialize, e));
                }
            }
        }
        set_fuel(&mut store, fuel);
        exports.context_create.call(&mut store, (ROOT_ID, 0)).map_err(|e| setup(Callback::ContextCreate, e))?;
        if let Some(vm_start) = vm_start {
            set_fuel(&mut store, fuel);
            let started = vm_start.call(&mut store, (ROOT_ID, 0)).map_err(|e| setup(Callback::VmStart, e))?;
            if started == 0 {
                return Err(WasmError::Configure("proxy_on_vm_start returned false".into()));
            }
        }
        if let Some(configure) = configure {
            set_fuel(&mut store, fuel);
            let size = plugin.config.len() as i32;
            let configured = configure.call(&mut store, (ROOT_ID, size)).map_err(|e| setup(Callback::Configure, e))?;
            if configured == 0 {
                return Err(WasmError::Configure("proxy_on_configure returned false (the module refused its plugin configuration)".into()));
            }
        }
        Ok(Worker { generation: GENERATIONS.fetch_add(1, Ordering::Relaxed), store, exports, next_id: ROOT_ID })
    }
}

fn set_fuel(store: &mut Store<HostState>, fuel: u64) {
    store.set_fuel(fuel).expect("fuel metering is on");
}

/// The exports every proxy-wasm module has, checked before any instance
/// runs so a module that is not one fails with its reason.
fn check_exports(module: &Module) -> Result<(), WasmError> {
    let has = |name: &str| module.get_export(name).is_some();
    if !has("proxy_abi_version_0_2_1") && !has("proxy_abi_version_0_2_0") {
        return Err(WasmError::Module(if has("proxy_abi_version_0_1_0") {
            "speaks proxy-wasm ABI 0.1.0; this host runs 0.2.0 and 0.2.1".into()
        } else {
            "exports no proxy_abi_version_0_2_1 (or 0_2_0) function: not a proxy-wasm module".into()
        }));
    }
    let mut missing = Vec::new();
    if !has("memory") {
        missing.push("memory");
    }
    if !has("proxy_on_memory_allocate") && !has("malloc") {
        missing.push("proxy_on_memory_allocate");
    }
    if !has("proxy_on_context_create") {
        missing.push("proxy_on_context_create");
    }
    if !missing.is_empty() {
        return Err(WasmError::Module(format!("does not export {}", missing.join(", "))));
    }
    Ok(())
}

fn required<P: wasmi::WasmParams, R: wasmi::WasmResults>(
    store: &Store<HostState>,
    func: Option<Func>,
    name: &str,
) -> Result<TypedFunc<P, R>, WasmError> {
    optional(store, func, name)?.ok_or_else(|| WasmError::Module(format!("does not export {name}")))
}

fn optional<P: wasmi::WasmParams, R: wasmi::WasmResults>(
    store: &Store<HostState>,
    func: Option<Func>,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>, WasmError> {
    match func {
        None => Ok(None),
        Some(f) => f
            .typed::<P, R>(store)
            .map(Some)
            .map_err(|_| WasmError::Module(format!("exports {name} with the wrong signature ({:?})", f.ty(store)))),
    }
}

fn stream_fn(store: &Store<HostState>, func: Option<Func>, name: &str) -> Result<Option<StreamFn>, WasmError> {
    let Some(f) = func else {
        return Ok(None);
    };
    if let Ok(t) = f.typed::<(i32, i32, i32), i32>(store) {
        return Ok(Some(StreamFn::WithEnd(t)));
    }
    if let Ok(t) = f.typed::<(i32, i32), i32>(store) {
        return Ok(Some(StreamFn::WithoutEnd(t)));
    }
    Err(WasmError::Module(format!("exports {name} with the wrong signature ({:?})", f.ty(store))))
}

pub(super) fn is_out_of_fuel(e: &wasmi::Error) -> bool {
    e.as_trap_code() == Some(wasmi::TrapCode::OutOfFuel)
}

/// What a failed call means for the request.
pub(super) fn classify(callback: Callback, fuel: u64, e: wasmi::Error) -> WasmError {
    if is_out_of_fuel(&e) {
        WasmError::OutOfFuel { callback, fuel }
    } else if let Some(code) = e.i32_exit_status() {
        WasmError::Trap { callback, message: format!("the module exited with status {code}") }
    } else {
        WasmError::Trap { callback, message: e.to_string() }
    }
}

impl StreamFn {
    pub fn call(self, store: &mut Store<HostState>, id: i32, size: i32, end: bool) -> Result<i32, wasmi::Error> {
        match self {
            StreamFn::WithEnd(f) => f.call(store, (id, size, end as i32)),
            StreamFn::WithoutEnd(f) => f.call(store, (id, size)),
        }
    }
}
