//! The HTTP front under connection pressure: many keep-alive clients at once must all be
//! served, even though tiny_http 0.12 can queue a new connection behind busy ones.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use txoutbox_service::orders::Announce;
use txoutbox_service::{http, HttpConfig};
use txoutbox_testkit::{stall_a_body, TestDb};

/// Sends one keep-alive GET and reads its response; returns the status, keeping the socket open.
fn get_keep_alive(addr: SocketAddr, stream: &mut BufReader<TcpStream>) -> Option<u16> {
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.get_mut().write_all(request.as_bytes()).ok()?;
    let mut status_line = String::new();
    stream.read_line(&mut status_line).ok()?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).ok()?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).ok()?;
    status_line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_burst_of_keep_alive_connections_is_served_in_full() {
    const CLIENTS: usize = 64;
    let t = TestDb::new();
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 4,
        ..HttpConfig::default()
    };
    let server = http::serve(&config, t.db.clone(), Announce::Notify).unwrap();
    let addr = server.addr();
    for round in 0..3 {
        // Every client connects at the same moment and keeps its connection open until all
        // of them have been answered: none may wait for another to close.
        let connected = Arc::new(Barrier::new(CLIENTS));
        let answered = Arc::new(Barrier::new(CLIENTS));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (connected, answered) = (connected.clone(), answered.clone());
                std::thread::spawn(move || {
                    connected.wait();
                    let stream = TcpStream::connect(addr).expect("connect");
                    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut stream = BufReader::new(stream);
                    let first = get_keep_alive(addr, &mut stream);
                    answered.wait();
                    let second = get_keep_alive(addr, &mut stream);
                    (first, second)
                })
            })
            .collect();
        for client in clients {
            let (first, second) = client.join().expect("client thread");
            assert_eq!(first, Some(200), "round {round}: a connection was never answered");
            assert_eq!(
                second,
                Some(200),
                "round {round}: a kept-alive connection stopped being served"
            );
        }
    }
}

#[test]
fn a_content_length_that_lies_gets_413_and_the_server_lives_on() {
    let t = TestDb::new();
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 2,
        ..HttpConfig::default()
    };
    let server = http::serve(&config, t.db.clone(), Announce::Notify).unwrap();
    let addr = server.addr();
    for declared in ["1125899906842624", "18446744073709551615", "70000"] {
        // The body promised is never sent: only the headers arrive.
        let head = format!(
            "POST /orders HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        );
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).unwrap();
        assert!(
            status_line.contains(" 413 "),
            "Content-Length {declared}: {status_line:?}"
        );
        drop(reader);
        let mut fresh = BufReader::new(TcpStream::connect(addr).expect("the server is still up"));
        fresh
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(
            get_keep_alive(addr, &mut fresh),
            Some(200),
            "after Content-Length {declared}"
        );
    }
    assert_eq!(t.count("SELECT count(*) FROM orders"), 0);
}

#[test]
fn a_stalled_body_gets_408_and_frees_its_handler_thread() {
    let t = TestDb::new();
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        threads: 1,
        idle_timeout: Duration::from_millis(500),
        ..HttpConfig::default()
    };
    let server = http::serve(&config, t.db.clone(), Announce::Notify).unwrap();
    let addr = server.addr();

    let mut stalled = stall_a_body(addr);
    stalled.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reply = String::new();
    let _ = stalled.read_to_string(&mut reply);
    assert!(
        reply.starts_with("HTTP/1.1 408"),
        "the stalled request: {reply:?}"
    );

    // The only handler thread is free again: the next client is served.
    let mut client = BufReader::new(TcpStream::connect(addr).unwrap());
    client
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(get_keep_alive(addr, &mut client), Some(200));
    assert_eq!(t.count("SELECT count(*) FROM orders"), 0);
}

#[test]
fn a_keep_alive_connection_idle_past_the_timeout_is_closed() {
    let t = TestDb::new();
    let config = HttpConfig {
        addr: "127.0.0.1:0".into(),
        idle_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    };
    let server = http::serve(&config, t.db.clone(), Announce::Notify).unwrap();
    let addr = server.addr();
    let mut client = BufReader::new(TcpStream::connect(addr).unwrap());
    client
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(get_keep_alive(addr, &mut client), Some(200));
    // Silent from here: the server closes its end (EOF), well before the client's 20 s.
    let mut rest = Vec::new();
    let read = client.read_to_end(&mut rest);
    assert!(
        matches!(read, Ok(0)),
        "expected the server to close the idle connection: {read:?}"
    );
}
