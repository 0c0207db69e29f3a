import XCTest
@testable import GemmaChatCore

final class ChunkTests: XCTestCase {
    func testPlansAreTheVectorPlans() throws {
        let chunks = try Vectors.load("chunks.json")
        for c in try Vectors.cases(chunks) {
            let n = c["n"] as! Int
            XCTAssertEqual(ChunkPlan.plan(n, accepted: try Vectors.ints(c["prefill_chunks"])), try Vectors.ints(c["plan"]), "n=\(n)")
        }
        for r in try Vectors.cases(chunks, "room") {
            XCTAssertEqual(ChunkPlan.fits(position: r["pos"] as! Int, count: r["n"] as! Int, maxContext: r["max_context"] as! Int),
                           r["fits"] as? Bool)
        }
    }

    func testPrefillCallsFollowThePlan() throws {
        let model = ScriptedModel([7, 7, 7, 7, 7])
        let generator = Generator(model: model, maxContext: 64, prefillChunks: [8, 1])
        _ = try generator.prefill(Array(0..<19))
        XCTAssertEqual(model.calls.map { $0.tokens.count }, [8, 8, 1, 1, 1])
        XCTAssertEqual(model.calls.map { $0.position }, [0, 8, 16, 17, 18])
        XCTAssertEqual(generator.position, 19)
    }

    func testPastTheContextIsAnError() throws {
        let generator = Generator(model: ScriptedModel([7]), maxContext: 5, prefillChunks: [1, 2, 3, 4, 5])
        XCTAssertThrowsError(try generator.prefill(Array(0..<6))) { error in
            XCTAssertEqual(error as? BundleError,
                           BundleError("6 tokens do not fit the context of 5; shorten the prompt or export with a larger --context."))
        }
    }
}
