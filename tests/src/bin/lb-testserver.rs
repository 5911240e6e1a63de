//! `lb-testserver`: the HTTP and UDP echo server the end-to-end tests run
//! in backend namespaces. See `lb_tests::testserver`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", lb_tests::testserver::USAGE);
        return ExitCode::SUCCESS;
    }
    match lb_tests::testserver::main_with_args(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-testserver: {e:#}\n{}", lb_tests::testserver::USAGE);
            ExitCode::from(2)
        }
    }
}
