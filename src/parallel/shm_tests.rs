use super::*;

/// Runs `f(rank, comm)` on one thread per rank and returns the results in rank order.
fn on_ranks<T: Send>(comms: Vec<ShmComm>, f: impl Fn(usize, &mut ShmComm) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, mut c)| {
                let f = &f;
                s.spawn(move || f(r, &mut c))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

#[test]
fn all_reduce_sums_in_rank_order_on_every_rank() {
    for n in [1, 2, 3, 4] {
        let out = on_ranks(group(n, 1), |r, c| {
            let mut results = Vec::new();
            // Several rounds exercise both slot parities.
            for round in 0..5 {
                let mut x: Vec<f32> = (0..6)
                    .map(|i| 0.1 * (r + 1) as f32 + i as f32 * 1e-3 + round as f32)
                    .collect();
                c.all_reduce_slice(&mut x, 2, 3).unwrap();
                results.push(x);
            }
            results
        });
        for round in 0..5 {
            let expected: Vec<f32> = (0..6)
                .map(|i| {
                    (0..n).fold(0.0f32, |acc, r| {
                        acc + (0.1 * (r + 1) as f32 + i as f32 * 1e-3 + round as f32)
                    })
                })
                .collect();
            for rank in &out {
                assert_eq!(rank[round], expected, "n={n} round={round}");
            }
        }
    }
}

#[test]
fn all_gather_concatenates_columns_in_rank_order() {
    let out = on_ranks(group(3, 1), |r, c| {
        // Rank r holds 2 rows of r + 1 columns, valued 100 r + 10 row + col.
        let cols = r + 1;
        let x: Vec<f32> = (0..2 * cols)
            .map(|i| (100 * r + 10 * (i / cols) + i % cols) as f32)
            .collect();
        let mut out = Vec::new();
        c.all_gather_cols_slice(&x, 2, cols, &mut out).unwrap();
        out
    });
    let expected = vec![
        0.0, 100.0, 101.0, 200.0, 201.0, 202.0, //
        10.0, 110.0, 111.0, 210.0, 211.0, 212.0,
    ];
    for o in out {
        assert_eq!(o, expected);
    }
}

#[test]
fn pipeline_links_pass_tensors_in_order_between_stages() {
    // tp 2 × pp 2: rank (stage 0, t) sends to (stage 1, t).
    let out = on_ranks(group(2, 2), |r, c| {
        let (stage, t) = (r / 2, r % 2);
        if stage == 0 {
            for k in 0..3 {
                c.send(vec![(10 * t + k) as f32; 4], 2, 2).unwrap();
            }
            Vec::new()
        } else {
            (0..3).map(|_| c.recv().unwrap().0[0]).collect()
        }
    });
    assert_eq!(out[2], vec![0.0, 1.0, 2.0]);
    assert_eq!(out[3], vec![10.0, 11.0, 12.0]);
}

#[test]
fn a_departed_peer_fails_the_collective_instead_of_hanging() {
    let mut comms = group(2, 1);
    let gone = comms.pop();
    drop(gone);
    let mut x = vec![1.0; 4];
    let err = comms[0].all_reduce_slice(&mut x, 1, 4).unwrap_err();
    assert!(matches!(err, CommError::PeerGone { rank: 0 }), "{err}");
}

#[test]
fn a_peer_that_panics_mid_step_releases_the_others() {
    let out = on_ranks(group(3, 1), |r, c| {
        let mut x = vec![1.0; 4];
        c.all_reduce_slice(&mut x, 1, 4).unwrap();
        if r == 2 {
            c.abort();
            return None;
        }
        Some(c.all_reduce_slice(&mut x, 1, 4).is_err())
    });
    assert_eq!(out, vec![Some(true), Some(true), None]);
}

#[test]
fn shape_mismatch_is_an_error() {
    let out = on_ranks(group(2, 1), |r, c| {
        let mut x = vec![1.0; 4 + r];
        c.all_reduce_slice(&mut x, 1, 4 + r).is_err()
    });
    assert_eq!(out, vec![true, true]);
}

#[test]
fn send_without_a_next_stage_is_an_error() {
    let mut comms = group(1, 1);
    assert!(matches!(
        comms[0].send(vec![0.0], 1, 1),
        Err(CommError::NoPeer { .. })
    ));
}
