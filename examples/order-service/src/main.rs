//! `order-service`: reads `PORT`, `TRELLIS_*` and `OTEL_*` (see the library) and serves
//! until Ctrl-C or SIGTERM.

use std::process::ExitCode;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let result = match order_service::ServiceEnv::from_env(order_service::SERVICE) {
        Ok(env) => order_service::run(env, trellis::service::shutdown_signal()).await,
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order-service: {e}");
            ExitCode::FAILURE
        }
    }
}
